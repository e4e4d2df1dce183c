"""Small Streamlit pieces the pages share: stage-missing notices, links to a feature, rendered views."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from app.run_dir import RunDir

FEATURE_PAGE = "views/feature.py"  # relative to app/main.py, as st.page_link and st.switch_page take it
VIEW_NAMES = {"overlay": "heatmap overlay", "heatmap": "heatmap", "masked": "mask", "crop": "crop",
              "original": "original"}


def need(run: RunDir, *stages: str) -> bool:
    """True when the run has every stage; otherwise an info box per missing one naming its command."""
    ok = True
    for stage in stages:
        if run.path(stage) is None:
            st.info(run.message(stage), icon=":material/info:")
            ok = False
    return ok


def facts(items: dict[str, str]) -> None:
    """Label/value pairs in columns; long values wrap (st.metric would cut them off)."""
    for col, (label, value) in zip(st.columns(len(items)), items.items()):
        col.caption(label)
        col.markdown(f"**{value}**")


def feature_link(feature: int, label: str = "") -> None:
    text = f"Feature {feature}" + (f" · {label}" if label else "")
    st.page_link(FEATURE_PAGE, label=text, query_params={"feature": str(feature)})


def open_sources(run: RunDir):
    """The run's FeatureSources, or None after an error box (missing stage or mismatched files)."""
    from app.state import sources
    from explain.feature_reader import FeatureFileError
    from interp.cache.reader import CacheError

    if not need(run, "features", "cache", "sae"):
        return None
    try:
        return sources(run)
    except (FeatureFileError, CacheError, FileNotFoundError) as e:
        st.error(str(e))
        return None


@st.cache_resource(show_spinner=False, max_entries=4096)
def _view(features: str, _mtime: int, _sources, feature: int, sample: int):
    from explain.render import render_example

    return render_example(_sources, feature, sample, display_size=160)


def render(run: RunDir, srcs, feature: int, sample: int):
    """All views of `feature` on the image of cached sample `sample` (explain.render.render_example), cached."""
    from app.state import mtime

    return _view(str(run.features), mtime(run.features), srcs, feature, sample)


def image_row(run: RunDir, srcs, feature: int, examples: Sequence, view: str, per_row: int = 6) -> None:
    """Examples (feature_reader.Example) as rows of their images in the chosen view, captioned with their values."""
    for start in range(0, len(examples), per_row):
        chunk = examples[start: start + per_row]
        cols = st.columns(per_row)
        for col, ex in zip(cols, chunk):
            with col:
                try:
                    img = getattr(render(run, srcs, feature, ex.sample), view)
                except Exception as e:  # an image that can no longer be loaded: say which, keep the page
                    st.warning(f"sample {ex.sample}: {e}")
                    continue
                st.image(img, caption=f"#{ex.sample} · max {ex.max:.3g} · mean {ex.mean:.3g}",
                         width="stretch")
