"""Feature list: search explanations, sort by score, density or max activation, filter, page through.

It opens on the best-scored explanations: whatever the sort, features whose explanation names something
come first, then "cannot tell", then the features not explained yet (uncheck "Explained first" to mix them).

All filtering and sorting is vectorised over the cached feature table (app.tables), so a
rerun costs the same for 100 features as for 100k.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import state, tables
from app.ui import FEATURE_PAGE, VAGUE, need

VAGUE_HELP = " · ".join(f"“{k}”: {v}" for k, v in VAGUE.items())
FIRST_HELP = ("whatever the sort: features whose explanation names something, then “cannot tell”, then features "
              "not explained yet · " + VAGUE_HELP)

run = state.current_run()
st.title("Feature list")
if not need(run, "features"):
    st.stop()
table = state.feature_table(run)
if run.explanations is None:
    st.caption(f"No explanations yet: `{run.command('explanations')}` writes them"
               + ("" if run.scores else f", then `{run.command('scores')}` scores them") + ".")

c1, c2, c3, c4 = st.columns([3, 2, 1, 1])
search = c1.text_input("Search explanations (or a feature index)", key="search")
sort = c2.selectbox("Sort by", list(tables.SORTS), key="sort")
descending = c3.toggle("Descending", value=True, key="descending")
size = c4.selectbox("Per page", [25, 50, 100, 250], index=1, key="page_size")
f1, f2, f3, f4, f5, f6 = st.columns(6)
modality = (st.segmented_control("Modality", ["all", "image", "text", "both"], default="all", key="modality",
                                 required=True) or "all") if "modality" in table else "all"
query = tables.Query(search=search, sort=sort, descending=descending, modality=modality,
                     hide_dead=f1.checkbox("Hide dead", value=True, key="hide_dead",
                                           help="features that never fire on any cached token (features.h5)"),
                     only_dense=f2.checkbox(f"Only dense (> {tables.DENSE:.0%} of tokens)", key="only_dense"),
                     only_unexplained=f3.checkbox("Only unexplained", key="only_unexplained"),
                     only_explained=f4.checkbox("Only explained", key="only_explained"),
                     explained_first=f5.checkbox("Explained first", value=True, key="explained_first",
                                                 help=FIRST_HELP),
                     hide_vague=f6.checkbox("Hide “cannot tell”", key="hide_vague", help=VAGUE_HELP))
rows = tables.select(table, query)
n_pages = max(1, -(-len(rows) // size))
counts = table["status"].value_counts()
groups = np.bincount(tables.explanation_group(table)[table["status"].to_numpy() != "dead"], minlength=3)
st.caption(f"{len(rows):,} of {len(table):,} features match · {counts.get('live', 0):,} live, "
           f"{counts.get('dense', 0):,} dense, {counts.get('dead', 0):,} dead (never fire on the cache)"
           + (f" · of the features that fire, {groups[0]:,} explained, {groups[1]:,} “cannot tell” (hover the "
              f"checkboxes for what it means), {groups[2]:,} not explained yet" if run.explanations else ""))
number = st.number_input(f"Page (of {n_pages})", min_value=1, max_value=n_pages, value=1, key="page") - 1
shown = table.iloc[tables.page(rows, number, size)].copy()
shown.insert(1, "open", [f"feature?feature={f}" for f in shown["feature"]])
event = st.dataframe(
    shown, hide_index=True, key="feature_table", on_select="rerun", selection_mode="single-row",
    column_order=["feature", "open", "explanation", "score", "density", "max", "mean_active", "n_active",
                  "image_share", "modality", "status"],
    column_config={
        "open": st.column_config.LinkColumn("open", display_text="open ↗", width="small"),
        "density": st.column_config.NumberColumn(format="%.2e"),
        "max": st.column_config.NumberColumn(format="%.3g"),
        "mean_active": st.column_config.NumberColumn("mean active", format="%.3g"),
        "image_share": st.column_config.NumberColumn("image share", format="%.2f"),
        "score": st.column_config.ProgressColumn("score", min_value=0.0, max_value=1.0, format="%.3f"),
    })
picked = getattr(getattr(event, "selection", None), "rows", None) or []
if picked:
    st.switch_page(FEATURE_PAGE, query_params={"feature": str(int(shown.iloc[picked[0]]["feature"]))})
