"""Sample explorer: a cached sample (by its index in the cache's samples table) or an uploaded image,
with a prompt; the top features of every image patch, and a patch's full list with its feature's heatmap.

A cached sample with its cached prompt reads its rows from the cache; anything else runs the
model at the cache's layer exactly as `interp cache` does (app.analysis.model_rows)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image, ImageDraw

from app import analysis, state
from app.ui import FEATURE_PAGE, follow_url, need, open_image, url_number

MAX_BUTTON_GRID = 64  # patches above which the patch picker is a select box only

run = state.current_run()
st.title("Sample explorer")
if not need(run, "cache", "sae"):
    st.stop()
reader, sae = state.reader(run), state.sae(run)
if not reader.has_images:
    st.info("This cache holds no images (a text-only model's cache): nothing to explore here.")
    st.stop()


@st.cache_data(show_spinner="Encoding the image's patches …", max_entries=64)
def cached_patches(cache: str, sample: int, mtimes: tuple[int, int], _reader, _sae) -> analysis.PatchFeatures:
    rows, tokens = analysis.cached_rows(_reader, sample)
    return analysis.patch_features(_sae, rows, tokens)


@st.cache_data(show_spinner="Running the model on the image …", max_entries=32)
def model_patches(cache: str, image_bytes: bytes, prompt: str, _sae) -> analysis.PatchFeatures:
    lm = state.model(run.model_name)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    rows, tokens = analysis.model_rows(lm, run.cache_meta, image, prompt)
    return analysis.patch_features(_sae, rows, tokens)


source = st.radio("Image", ["cached sample", "upload"], horizontal=True, key="source")
if source == "cached sample":
    pick, _ = st.columns([1, 3])
    url_number("sample", 0, reader.n_samples - 1, 0, "cached sample")
    sample_index = int(pick.number_input(f"Cached sample (0 .. {reader.n_samples - 1})", min_value=0,
                                         max_value=reader.n_samples - 1, key="sample"))
    follow_url("sample", sample_index)
    sample = reader.sample(sample_index)
    image = open_image(sample.image_ref, run.cache_meta)
    if image is None:
        st.stop()
    cached_prompt = sample.prompt
    st.caption(f"`{sample.image_ref}` · source index {sample.source_index} · cached prompt: `{cached_prompt}`")
    prompt = st.text_input("Prompt", value=cached_prompt, key="prompt_cached")
else:
    upload = st.file_uploader("Upload an image", type=["png", "jpg", "jpeg", "webp", "bmp"], key="upload")
    if upload is None:
        st.info("Upload an image to see its features.")
        st.stop()
    image = Image.open(upload).convert("RGB")
    cached_prompt = None
    prompt = st.text_input("Prompt", value=reader.prompts[0], key="prompt_upload")

if source == "cached sample" and prompt == cached_prompt:
    stamps = (state.mtime(run.cache), state.mtime(run.sae / "sae_weights.safetensors"))
    pf = cached_patches(str(run.cache), sample_index, stamps, reader, sae)
else:
    if not run.model_name:
        st.error("The SAE and the cache do not record their model: cannot run it on a new image or prompt.")
        st.stop()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        pf = model_patches(str(run.cache), buf.getvalue(), prompt, sae)
    except Exception as e:  # a model that cannot run here, or an image the processor refuses
        st.error(f"Cannot run {run.model_name} on this image: {e}")
        st.stop()
if not len(pf.tokens):
    st.warning("No image-patch tokens for this image.")
    st.stop()

labels = state.labels(run)
n = len(pf.tokens)
names = [pf.label(i) for i in range(n)]
if st.session_state.get("patch") not in names:
    st.session_state["patch"] = names[int(pf.top_val[:, 0].argmax())]


def _pick(name: str) -> None:
    st.session_state["patch"] = name


left, right = st.columns([1, 1])
with right:
    st.subheader("Patch")
    tiles = pf.tokens["tile"]
    if n <= MAX_BUTTON_GRID and (tiles == tiles[0]).all():
        n_rows, n_cols = int(pf.tokens["row"].max()) + 1, int(pf.tokens["col"].max()) + 1
        where = {(int(t["row"]), int(t["col"])): i for i, t in enumerate(pf.tokens)}
        for r in range(n_rows):
            for c, col in enumerate(st.columns(n_cols)):
                i = where.get((r, c))
                if i is not None:
                    top = int(pf.top_idx[i, 0]) if pf.top_val[i, 0] > 0 else None
                    text = "·" if top is None else f"{top}" + (f" · {labels[top][:12]}" if top in labels else "")
                    col.button(text, key=f"patch_{r}_{c}", on_click=_pick, args=(names[i],), width="stretch",
                               type="primary" if names[i] == st.session_state["patch"] else "secondary",
                               help=f"{names[i]}: top feature {top}"
                               + (f" · {labels[top]}" if top in labels else ""))
    patch = names.index(st.selectbox("Patch (row, col)", names, key="patch"))
    active = pf.top_val[patch] > 0
    feats = pf.top_idx[patch][active]
    frame = pd.DataFrame({"feature": feats, "activation": pf.top_val[patch][active],
                          "open": [f"feature?feature={g}" for g in feats],
                          "explanation": [labels.get(int(g), "") for g in feats]})
    st.dataframe(frame, hide_index=True, column_config={
        "open": st.column_config.LinkColumn("open", display_text="open ↗"),
        "activation": st.column_config.NumberColumn(format="%.4g")})
    if not len(feats):
        st.caption("No feature fires on this patch.")

with left:
    options = [int(g) for g in feats] or [int(g) for g in pf.features]
    shown = st.selectbox("Heatmap of feature", options, key="heatmap_feature",
                         format_func=lambda g: f"{g}" + (f" · {labels[g]}" if g in labels else ""))
    from explain.render import render_feature

    acts = pf.column(shown) if shown is not None else np.zeros(n, np.float32)
    view = render_feature(image, pf.tokens, acts, display_size=384)
    img = view.contour.copy()  # an outline: the objects keep their colours
    box = np.array([pf.tokens[k][patch] for k in ("x0", "y0", "x1", "y1")], float) * view.scale
    ImageDraw.Draw(img).rectangle(box.round().tolist(), outline=(0, 200, 255), width=3)
    st.image(img, caption=f"where feature {shown} fires (black and white outlines at 20% and 60% of its max "
                          "here); the selected patch is framed in cyan", width="content")
    if shown is not None:
        st.page_link(FEATURE_PAGE, label=f"Open feature {shown}", query_params={"feature": str(shown)})

st.subheader("Strongest features of the whole image")
best = pf.acts.max(0) if pf.acts.size else np.zeros(0)
order = np.argsort(-best)[:20]
st.dataframe(pd.DataFrame({"feature": pf.features[order], "max over patches": best[order],
                           "patches": (pf.acts[:, order] > 0).sum(0),
                           "explanation": [labels.get(int(g), "") for g in pf.features[order]]}),
             hide_index=True)
st.caption(f"{n} patches · top {pf.top_idx.shape[1]} features per patch")
