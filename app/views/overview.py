"""Overview: what the run is (model, layer, SAE), how good the SAE is, and how well it recovers ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.io as pio
import streamlit as st

from app import charts, state
from app.ui import facts, need
from saes import figures

run = state.current_run()
st.title("Overview")
if not run.exists:
    st.error(run.message("features"))
    st.stop()
if all(s.path is None for s in run.status()):
    st.info(f"{run.given} holds no stage outputs yet. Make a whole run on the shapes world with "
            f"`interp demo {run.given}`, or run the stages one by one (each page names its command).")

# ---------------------------------------------------------------- what the run is
cfg = run.sae_cfg
ours = ((cfg.get("metadata") or {}).get("lmmscope") or {}).get("config") or {}
meta = run.cache_meta
data = meta.get("data")
sae_text = (f"{ours.get('arch', cfg.get('architecture', '?'))}, {cfg.get('d_sae', '?')} features"
            + (f", k={ours['k']}" if ours.get("k") else "") + f", d_in {cfg.get('d_in', '?')}")
facts({"Model": run.model_name or "unknown",
       "Layer": f"{run.layer or '?'}" + (f" ({meta['site']})" if meta.get("site") else ""),
       "SAE": sae_text if cfg else "missing",
       "Cache": f"{meta.get('n_rows', 0):,} rows of {meta.get('n_samples', 0):,} samples" if meta else "missing",
       "Data": data.get("kind", "?") if isinstance(data, dict) else str(data or "?")})
with st.expander("Run details"):
    details = {"SAE config": ours or cfg, "cache": {k: meta.get(k) for k in
               ("model", "layer", "site", "module_path", "roles", "dtype", "data", "prompt_template", "created")},
               "stage runs": run.run_info}
    st.json(details, expanded=False)
need(run, "cache", "sae")

# ---------------------------------------------------------------- evaluation
st.header("Evaluation")
ev = state.json_file(run.eval)
if need(run, "eval"):
    spliced = ev.get("spliced") or {}
    items = [("FVU", ev.get("fvu")), ("L0", ev.get("l0")), ("never fire (eval)", ev.get("dead_fraction")),
             ("dense", ev.get("dense_fraction")), ("CE loss recovered", spliced.get("ce_loss_recovered")),
             ("KL (SAE spliced)", spliced.get("kl_spliced"))]
    items = [(k, v) for k, v in items if isinstance(v, (int, float))]
    helps = {"never fire (eval)": figures.eval_dead_label(ev.get("rows")) + "; the training curves' dead "
                                 "fraction counts features silent for the last dead-window steps instead"}
    for col, (k, v) in zip(st.columns(len(items) or 1), items):
        col.metric(k, f"{v:.3g}" if abs(v) < 1e-3 else f"{v:.4g}", help=helps.get(k))
    vqa = ev.get("vqa")
    if isinstance(vqa, dict) and vqa:
        st.caption("Organism VQA accuracy, clean and with the SAE spliced in")
        st.dataframe(pd.DataFrame(vqa).T, width="content")
    with st.expander(run.layout.eval.name):
        st.json({k: v for k, v in ev.items() if k != "density_histogram"}, expanded=False)

# ---------------------------------------------------------------- training, density, scores
st.header("Training curves")
metrics = state.metrics(run)
if need(run, "metrics") and metrics is not None and len(metrics):
    trained = (run.run_info.get("train_run.json") or {}).get("run") or {}
    window = (trained.get("train") or {}).get("dead_window")
    st.plotly_chart(charts.training_curves(metrics, window), key="training")
    st.caption(f"The training curves' dead fraction counts features silent for the last "
               f"{f'{window:,}' if window else 'dead-window'} steps; the evaluation's (above) and the feature list's "
               "count features that never fire on the cache. A feature can be silent for a window of training and "
               "still fire somewhere in the cache, and the other way round.")
left, right = st.columns(2)
with left:
    st.header("Feature density")
    stats = state.stats(run)
    if stats is not None:
        st.plotly_chart(charts.density_histogram(stats.summary_table()["density"], stats.meta.get("n_rows")),
                        key="density")
    elif run.density_figure is not None:
        st.plotly_chart(pio.from_json(run.density_figure.read_text()), key="density")
    elif ev.get("density_histogram"):
        st.plotly_chart(charts.density_from_eval(ev["density_histogram"]), key="density")
    else:
        need(run, "features")
with right:
    st.header("Explanation scores")
    if need(run, "scores"):
        table = state.feature_table(run)
        values = table["score"].to_numpy() if table is not None else np.array([])
        values = values[np.isfinite(values)]
        if len(values):
            st.plotly_chart(charts.score_histogram(values), key="scores")
        else:
            st.info(f"scores.jsonl holds no usable scores yet; run `{run.command('scores')}`.")
        summary = state.json_file(run.score_summary)
        if summary:
            with st.expander(run.layout.score_summary.name):
                st.json(summary, expanded=False)

# ---------------------------------------------------------------- ground truth
st.header("Ground-truth recovery (shapes world)")
rec = state.recovery(run)
if run.recovery is None and run.cache and not run.is_shapes:
    st.caption("No ground truth: this cache does not hold shapes-world images.")
elif need(run, "recovery") and rec is not None:
    concepts = rec.to_json()["concepts"]
    cols = st.columns(4)
    cols[0].metric("Concepts recovered", f"{len(rec.recovered)}/{len(concepts)}", help=f"F1 >= {rec.f1_min}")
    ceiling = rec.linear_ceiling
    present = "n/a" if ceiling is None else f"{round(ceiling * len(concepts))}/{len(concepts)}"
    cols[1].metric("Linearly present", present,
                   help=f"concepts a held-out linear probe finds at F1 >= {rec.f1_min}: what any SAE could recover")
    cols[2].metric("Mean F1 (SAE)", f"{rec.mean_f1:.3f}")
    cols[3].metric("Mean F1 (best raw neuron)", f"{rec.mean_neuron_f1:.3f}")
    if concepts:
        st.plotly_chart(charts.recovery_bars(concepts), key="recovery")
        frame = pd.DataFrame(concepts)
        frame["open"] = [f"feature?feature={c['feature']}" for c in concepts]
        st.dataframe(frame, hide_index=True, column_config={
            "open": st.column_config.LinkColumn("open", display_text=r"feature\?feature=(\d+)"),
            "threshold": st.column_config.NumberColumn(format="%.4g")}
            | {c: st.column_config.NumberColumn(format="%.3f")
               for c in ("f1", "precision", "recall", "auroc", "neuron_f1", "probe_f1")})
