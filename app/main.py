"""The lmmscope app: `interp app RUN_DIR` runs `streamlit run app/main.py -- RUN_DIR`.

Pages (app/views/, one file each): overview, feature list, feature page, sample explorer,
steering playground. Every page reads the one run directory the app was started on
(app.state.current_run) and names the command that makes whatever stage is missing.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.state import current_run

HERE = Path(__file__).parent

st.set_page_config(page_title="lmmscope", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page(HERE / "views" / "overview.py", title="Overview", icon=":material/dashboard:", url_path="overview",
            default=True),
    st.Page(HERE / "views" / "feature_list.py", title="Feature list", icon=":material/list:", url_path="features"),
    st.Page(HERE / "views" / "feature.py", title="Feature", icon=":material/search:", url_path="feature"),
    st.Page(HERE / "views" / "samples.py", title="Sample explorer", icon=":material/image:", url_path="samples"),
    st.Page(HERE / "views" / "steering.py", title="Steering", icon=":material/tune:", url_path="steering"),
]

page = st.navigation(PAGES)
run = current_run()
with st.sidebar:
    st.caption("Run directory")
    st.code(run.given, language=None)
    if run.exists:
        missing = run.missing()
        if missing:
            st.caption("Missing stages: " + ", ".join(m.stage for m in missing))
        for sub in run.subruns():
            st.caption(f"Also a run inside: `{sub.name}/`; open it with "
                       f"`interp app {run.given.rstrip('/')}/{sub.name}`")
page.run()
