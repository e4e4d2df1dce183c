"""Steering playground: pick features, how to change each (clamp / add / ablate, strength, unit,
positions), and compare the model's baseline and steered answers side by side.

Generation is the steering stage's own (steering.steer.steer_one: greedy decoding with the SAE
edit at its layer, the SAE's error term kept), so the playground gives what `interp steer` gives."""

from __future__ import annotations

import io

import pandas as pd
import streamlit as st
from PIL import Image

from app import state
from app.ui import need

MAX_OPTIONS = 2000  # features listed in the picker (others can be typed)

run = state.current_run()
st.title("Steering playground")
if not need(run, "sae"):
    st.stop()
try:
    from steering.interventions import MODES, POSITIONS, UNITS, Intervention
    from steering.steer import Query, setup_for, steer_one
except ImportError as e:
    st.info(f"The steering stage is not available in this installation ({e}); it provides `interp steer`.")
    st.stop()
if not run.model_name:
    st.error("The SAE and the cache do not record their model, so there is nothing to steer.")
    st.stop()


@st.cache_resource(show_spinner="Loading the model and checking the SAE against it …", max_entries=2)
def setup(model: str, run_dir: str, layer: str | None, mtimes: tuple[int, int]):
    return setup_for(state.model(model), state.sae(run), run.layout, layer)


try:  # the layer: the cache's (the SAE need not record it); it must match the SAE's own where it does
    steer = setup(run.model_name, str(run.root), run.cache_meta.get("layer"),
                  (state.mtime(run.features), state.mtime(run.sae / "sae_weights.safetensors")))
except Exception as e:  # the SAE does not fit the model, or the model cannot load here
    st.error(f"Cannot steer {run.model_name} with this SAE: {e}")
    st.stop()

# ---------------------------------------------------------------- the query
reader = state.reader(run)
multimodal = steer.lm.is_multimodal
image, ref, default_prompt = None, "", "describe the image ."
if multimodal:
    source = st.radio("Image", ["cached sample", "upload"], horizontal=True, key="steer_source")
    if source == "cached sample" and reader is not None and reader.n_samples:
        from app.ui import open_image

        i = int(st.number_input(f"Cached sample (0 .. {reader.n_samples - 1})", 0, reader.n_samples - 1, 0,
                                key="steer_sample"))
        sample = reader.sample(i)
        ref, default_prompt = sample.image_ref, sample.prompt
        image = open_image(ref, run.cache_meta)  # None after a warning: the "Choose an image" note follows
    else:
        if source == "cached sample":
            need(run, "cache")
        upload = st.file_uploader("Upload an image", type=["png", "jpg", "jpeg", "webp", "bmp"], key="steer_upload")
        if upload is not None:
            image, ref = Image.open(io.BytesIO(upload.getvalue())).convert("RGB"), f"upload:{upload.name}"
    if image is None:
        st.info("Choose an image to steer on.")
        st.stop()
prompt = st.text_input("Prompt", value=default_prompt, key="steer_prompt",
                       help="on the shapes world, e.g. “what color is the circle ?” or “describe the image .”")
if image is not None:
    scale = max(1, 160 // max(image.size))  # small images (the shapes world's 48 px) drawn with crisp pixels
    st.image(image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST))
    st.caption(f"`{ref}`")

# ---------------------------------------------------------------- the interventions
labels = state.labels(run)
table = state.feature_table(run)
d_sae = steer.sae.cfg.d_sae
if table is not None:  # live features, densest first; a long list is cut (type any other index to add it)
    live = table.loc[table["status"] != "dead"].sort_values("density", ascending=False)["feature"].tolist()
else:
    live = list(range(d_sae))
is_live = set(live)
recovered = [f for f in state.recovery_by_feature(run) if f in is_live]
options = list(dict.fromkeys(recovered + live[:MAX_OPTIONS]))


def _label(g) -> str:
    return f"{g} · {labels[g]}" if g in labels else str(g)


picked = st.multiselect("Features", options, default=recovered[:1] or options[:1], key="steer_features",
                        accept_new_options=True, format_func=_label,
                        help=f"{len(options)} of the {len(live)} live features listed; type any index 0 .. {d_sae - 1}")
chosen = []
for g in picked:
    if str(g).strip().isdigit() and 0 <= int(g) < d_sae:
        chosen.append(int(g))
    else:
        st.warning(f"{g!r} is not a feature index (0 .. {d_sae - 1})")
chosen = list(dict.fromkeys(chosen))
units = sorted(UNITS, key=lambda u: u != "max") if steer.max_acts is not None else ["absolute"]
interventions = []
for g in chosen:
    c = st.columns([1, 2, 2, 2, 2])
    c[0].markdown(f"**{g}**")
    mode = c[1].selectbox("mode", MODES, key=f"mode_{g}")
    unit = c[3].selectbox("unit", units, key=f"unit_{g}", disabled=mode == "ablate",
                          help="max: multiples of the feature's max activation over the cache")
    value = c[2].number_input("strength", value=2.0 if unit == "max" else 10.0, key=f"value_{g}",
                              disabled=mode == "ablate")
    positions = c[4].selectbox("positions", POSITIONS if multimodal else [p for p in POSITIONS if p != "image"],
                               key=f"positions_{g}")
    interventions.append(Intervention(int(g), mode, float(value), unit, positions))
max_new = st.slider("Tokens to generate", 1, 32, 8, key="steer_tokens")

if st.button("Generate", type="primary", key="steer_go", disabled=not interventions):
    try:
        with st.spinner("Generating baseline and steered answers …"):
            result = steer_one(steer, Query(prompt, image, ref), interventions, max_new_tokens=max_new)
    except Exception as e:  # a bad strength, or an image the processor refuses: keep the page
        st.error(str(e))
        st.stop()
    base, steered = st.columns(2)
    base.subheader("Baseline")
    base.code(result.baseline or "(empty)", language=None)
    steered.subheader("Steered")
    steered.code(result.steered or "(empty)", language=None)
    st.caption("Steering: " + "; ".join(iv.describe() for iv in interventions)
               + f" · next-token KL(baseline ‖ steered) = {result.kl:.4f} nats")
    st.dataframe(pd.DataFrame([{"token": c.token, "p baseline": c.p_base, "p steered": c.p_steered, "Δp": c.delta}
                               for c in result.changes]), hide_index=True)
