"""Feature page: explanation and scores, top samples and quantile samples with heatmaps, activation
histogram, logit effects, nearest features by decoder cosine, and the shapes world's ground truth."""

from __future__ import annotations

import math

import numpy as np
import streamlit as st

from app import actions, analysis, charts, state
from app.tables import explanation_text
from app.ui import VIEW_NAMES, explanation_note, feature_link, follow_url, image_row, need, open_sources, url_number

run = state.current_run()
if not need(run, "features"):
    st.title("Feature")
    st.stop()
table = state.feature_table(run)
d_sae = len(table)
recovered = [g for g in state.recovery_by_feature(run) if 0 <= g < d_sae]
default = recovered[0] if recovered else int(table["density"].to_numpy().argmax())
pick, _ = st.columns([1, 3])
url_number("feature", 0, d_sae - 1, default, "feature")
f = int(pick.number_input(f"Feature (0 .. {d_sae - 1})", min_value=0, max_value=d_sae - 1, step=1, key="feature"))
follow_url("feature", f)
row = table.iloc[f]
explanations, scores = state.explanations(run), state.scores(run)
text = explanation_text(explanations.get(f, {})) or row["explanation"]
st.title(f"Feature {f}" + (f" · {text}" if text else ""))

cols = st.columns(6)
cols[0].metric("Density", f"{row['density']:.3g}")
cols[1].metric("Max activation", f"{row['max']:.4g}")
cols[2].metric("Mean when active", f"{row['mean_active']:.4g}")
cols[3].metric("Active tokens", f"{int(row['n_active']):,}")
share = row.get("image_share", math.nan)
cols[4].metric("Image share", "n/a" if not np.isfinite(share) else f"{share:.0%}",
               help="share of the feature's total activation on image tokens (the rest is on text tokens)")
cols[5].metric("Status", row["status"])
if row["status"] == "dead":
    st.warning("This feature never fires on the cached tokens: it has no examples.")

# ---------------------------------------------------------------- explanation, scores, ground truth
left, right = st.columns(2)
with left:
    st.subheader("Explanation")
    if f in explanations:
        rec = explanations[f]
        by = f" — {rec['explainer']}" if rec.get("explainer") else ""
        st.markdown(f"**{explanation_text(rec) or '(empty)'}**{by}")
        note = explanation_note(explanation_text(rec))
        if note:
            st.caption(f"“{explanation_text(rec)}”: {note}.")
    elif run.explanations is None:
        st.info(run.message("explanations"))
    else:
        st.caption("Not explained yet.")
    if f in scores:
        det = scores[f].get("detection") or {}
        items = [("balanced accuracy", det.get("balanced_accuracy", scores[f].get("score"))), ("F1", det.get("f1")),
                 ("AUROC", det.get("auroc")), ("IoU (tokens)", (scores[f].get("iou") or {}).get("tokens"))]
        items = [(k, v) for k, v in items if isinstance(v, (int, float))]
        for col, (k, v) in zip(st.columns(len(items) or 1), items):
            col.metric(k, f"{v:.3f}")
        if det.get("recall_by_source"):
            recall = det["recall_by_source"].items()
            st.caption("Recall by example source: " + ", ".join(f"{k} {v:.2f}" for k, v in recall))
    elif f in explanations:
        st.caption(f"Not scored yet (`{run.command('scores')} --features {f}`).")
    if actions.explain_available():
        if st.button("Explain and score now", key="explain_now", disabled=row["status"] == "dead"):
            with st.spinner(f"Explaining and scoring feature {f} …"):
                code, log = actions.explain_and_score(run, f)
            (st.success if code == 0 else st.error)(f"interp explain/score finished with status {code}")
            with st.expander("log", expanded=code != 0):
                st.code(log or "(no output)", language=None)
    else:
        st.caption("To explain and score this feature, run:")
        st.code(actions.shell_commands(run, f), language="bash")
with right:
    st.subheader("Ground truth (shapes world)")
    matched = state.recovery_by_feature(run).get(f, [])
    if run.recovery is None and run.cache and not run.is_shapes:
        st.caption("No ground truth: this cache does not hold shapes-world images.")
    elif run.recovery is None:
        st.info(run.message("recovery"))
    elif matched:
        for c in matched:
            st.markdown(f"Best feature for **{c.concept}**: F1 {c.f1:.3f} (best raw neuron {c.neuron_f1:.3f}, "
                        f"linear probe {c.probe_f1:.3f}), "
                        f"precision {c.precision:.3f}, recall {c.recall:.3f}")
    else:
        st.caption("recovery.json matches no concept to this feature.")
    rows = state.reader(run).n_rows if run.cache and run.is_shapes else 0
    cheap = rows <= state.CHEAP_ROWS or st.button(f"Score this feature on every concept ({rows:,} cached rows)",
                                                  key="concept_scores")
    if rows and row["status"] != "dead" and cheap:
        try:
            frame = state.concept_scores(run, f)
        except ValueError as e:  # an SAE that does not fit the cache
            frame = None
            st.warning(f"Cannot score this feature on the cache: {e}")
        if frame is not None:
            st.caption("How well this feature detects each concept on the cached patches (F1 at its best "
                       "threshold; IoU of the patches where it fires with the concept's patches)")
            st.dataframe(frame[["concept", "f1", "iou", "auroc", "precision", "recall", "threshold"]],
                         hide_index=True, height=200, column_config={
                             c: st.column_config.NumberColumn(format="%.3f") for c in ("f1", "iou", "auroc",
                                                                                       "precision", "recall")}
                         | {"threshold": st.column_config.NumberColumn(format="%.4g")})

if row["status"] == "dead":
    st.stop()

# ---------------------------------------------------------------- histogram, logit effects, neighbours
stats = state.stats(run)
h, lg, nb = st.columns(3)
with h:
    st.subheader("Activation histogram")
    st.plotly_chart(charts.activation_histogram(*stats.histogram(f)), key="histogram")
with lg:
    st.subheader("Logit effects")
    name = run.model_name
    if not name:
        st.info("The SAE and the cache do not record their model, so its unembedding is unknown.")
    elif need(run, "sae") and st.toggle("Through the unembedding", value=True, key="logit_toggle",
                   help="W_dec[f] scaled by the final norm's weight, times W_U (loads the model once)"):
        try:
            lm = state.model(name)
            w_u, scale = analysis.unembedding(lm)
            promoted, suppressed = analysis.logit_effects(state.sae(run).W_dec[f], w_u, scale, lm.tokenizer, k=8)
            st.plotly_chart(charts.token_effect_bars(promoted, suppressed), key="logits")
        except Exception as e:  # a model that cannot be loaded here (no network, too large): say so
            st.warning(f"Cannot compute logit effects with {name}: {e}")
with nb:
    st.subheader("Nearest features")
    unit = state.unit_decoder(run)
    if unit is not None:
        labels = state.labels(run)
        for g, cos in analysis.nearest_features(unit, f, k=8):
            feature_link(g, f"cos {cos:.3f}" + (f" · {labels[g]}" if g in labels else "")
                         + (" · dead" if table["status"].iat[g] == "dead" else ""))
    else:
        need(run, "sae")

# ---------------------------------------------------------------- images
srcs = open_sources(run)
st.header("Top samples")
c1, c2 = st.columns([3, 1])
view = c1.segmented_control("View", list(VIEW_NAMES), format_func=VIEW_NAMES.get, default="overlay", key="view",
                            required=True) or "overlay"
by = c2.segmented_control("Rank samples by", ["max", "mean"], default=stats.rank_by, key="rank_by",
                          required=True) or stats.rank_by
if srcs is not None and stats.meta.get("n_text_rows"):  # image and text tokens: the two side by side
    from app.text_view import examples_by_modality

    examples_by_modality(run, srcs, stats, f, view, by)
elif srcs is not None:
    image_row(run, srcs, f, stats.top(f, by)[:12], view)
    st.header("Quantile samples")
    st.caption("Activating samples from the bands of the per-sample value, lowest band first")
    for band in stats.quantile_samples(f, n_bands=4, per_band=6, by=by):
        st.markdown(f"**{band.q_lo:.0%} – {band.q_hi:.0%}**")
        image_row(run, srcs, f, band.examples, view)
