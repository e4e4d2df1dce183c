"""The lmmscope app: `interp app RUN_DIR` runs `streamlit run app/main.py -- RUN_DIR`.

Pages (app/views/, one file each): overview, feature list, feature page, sample explorer,
steering playground. Every page reads the one run directory the app was started on
(app.state.current_run) and names the command that makes whatever stage is missing.

Offline: nothing is fetched from another host. The favicon is an emoji (Streamlit draws it as an
inline SVG; a ":material/...:" favicon would be fetched from fonts.gstatic.com), the page icons come
from the Material Symbols font Streamlit serves itself, and plotly.js is Streamlit's own bundle.

URLs: the overview answers at / and /overview, and any other unknown path lands on it too (instead of
Streamlit's "Page not found").
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import streamlit as st

from app.state import current_run

HERE = Path(__file__).parent
OVERVIEW = HERE / "views" / "overview.py"
PAGE_ICON = "🔬"
HOME = "home"  # the default page's own name (it is served at /); /overview is an alias of it

st.set_page_config(page_title="lmmscope", page_icon=PAGE_ICON, layout="wide")

PAGES = [
    st.Page(OVERVIEW, title="Overview", icon=":material/dashboard:", url_path=HOME, default=True),
    st.Page(HERE / "views" / "feature_list.py", title="Feature list", icon=":material/list:", url_path="features"),
    st.Page(HERE / "views" / "feature.py", title="Feature", icon=":material/search:", url_path="feature"),
    st.Page(HERE / "views" / "samples.py", title="Sample explorer", icon=":material/image:", url_path="samples"),
    st.Page(HERE / "views" / "steering.py", title="Steering", icon=":material/tune:", url_path="steering"),
]


def requested_path() -> str:
    """The page name in the browser's URL ("" at the root)."""
    url = st.context.url or ""
    name = urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name or "") else ""


known = {p.url_path for p in PAGES} | {HOME}
aliases = {"overview"} | ({requested_path()} - known - {""})
PAGES += [st.Page(OVERVIEW, title="Overview", url_path=name, visibility="hidden") for name in sorted(aliases)]
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
