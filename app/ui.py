"""Small Streamlit pieces the pages share: stage-missing notices, links to a feature, rendered views."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from app.run_dir import RunDir
from explain.aggregate import CANNOT_TELL, CONTEXT

FEATURE_PAGE = "views/feature.py"  # relative to app/main.py, as st.page_link and st.switch_page take it
# the default first: an outline keeps every pixel's colour (a colour overlay turns red objects orange)
VIEW_NAMES = {"contour": "outline", "overlay": "heatmap overlay", "heatmap": "heatmap", "masked": "mask",
              "crop": "crop", "original": "original"}
VAGUE = {CANNOT_TELL: "the explainer found nothing the regions where the feature fires have in common that the "
                      "regions where it is silent lack; no region's description satisfies it, so its detection "
                      "is at chance (0.5)"}


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


def url_number(key: str, lo: int, hi: int, default: int, what: str) -> None:
    """Let ?KEY= drive the number input `key` (drawn after this, without a `value`): a link, a typed URL or
    the browser's back button sets it; an id that is not a number in lo..hi gets a warning and `default`.
    `follow_url` then writes the input's value back, so the URL follows every change."""
    raw = st.query_params.get(key)
    if raw is not None and (raw != st.session_state.get(f"url_{key}") or key not in st.session_state):
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            st.warning(f"?{key}={raw} is not a {what} of this run ({lo} .. {hi}): showing {what} "
                       f"{st.session_state.get(key, default)} instead.")
        else:
            st.session_state[key] = value
    st.session_state.setdefault(key, default)


def follow_url(key: str, value: int) -> None:
    """Put the shown number into the URL (?KEY=value), so it can be shared, reloaded and gone back to."""
    text = str(int(value))
    st.query_params[key] = text  # even when unchanged here: the browser's address bar is updated by this message
    st.session_state[f"url_{key}"] = text


def explanation_note(text: str) -> str | None:
    """What a "cannot tell" explanation, or one with context ("empty background ; the image also holds a red
    object"), means; None for any other text."""
    text = (text or "").strip()
    if text.lower() in VAGUE:
        return VAGUE[text.lower()]
    region, sep, context = text.partition(CONTEXT.strip())
    region, context = region.strip(), context.strip()
    if not sep or not context:
        return None
    where = ("its regions share nothing the silent ones lack" if region.lower() == CANNOT_TELL
             else f"it fires on {region}")
    return (f"{where}, and the images it fires on hold {context} (somewhere else in the image) clearly more often "
            "than images where it is silent: the image tokens attend to the ones before them, so a patch can carry "
            "what is elsewhere in the image")


def open_image(ref: str, cache_meta: dict):
    """The image of a cached sample, read only under the cache's recorded data roots; None after a warning
    naming the reference when it cannot be read or points elsewhere."""
    from interp.cache.data import data_roots, load_image

    try:
        return load_image(ref, data_roots(cache_meta.get("data")))
    except Exception as e:  # unreadable, moved, or outside the data roots: say which and keep the page
        st.warning(f"Cannot show image `{ref}`: {e}")
        return None


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
def _view(features: str, mtime_ns: int, _sources, feature: int, sample: int):
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
