"""`interp steer-targets`: steering and attribution measured against the shapes world's ground truth.

1. Strength selection: a sweep clamping each colour's recovered feature on held-out
   validation questions "what color is the <shape> ?"; the sweep picks each feature's strength.
2. Flip rate at those strengths on test questions (other scenes) whose object has another
   colour: the answer should become the feature's colour.
3. Attribution on test questions (answer = the true colour, baseline = the most likely other
   colour): how often the true colour's feature is in the top 5, and the rank correlation of
   the attribution with the measured effect of ablating each active feature.
4. Reach: how often answers change when the layer's image-token activations are swapped with
   another image's. Near zero means the model has already read the image before this layer,
   so no image-token feature here can steer the answer or carry attribution.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from interp.infra.durable import write_json
from interp.infra.layout import RunLayout
from steering.sweep import FeatureEntry, SweepSpec, WorldItems, run_sweep

DEFAULT_STRENGTHS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


def shapes_targets(run: str | Path | RunLayout, *, n_select: int = 100, n_eval: int = 200, n_attr: int = 200,
                   strengths: tuple[float, ...] = DEFAULT_STRENGTHS, positions: str = "image", ig_steps: int = 4,
                   engine: str = "nnsight", batch_size: int = 50, device: str = "auto", progress: bool = True) -> dict:
    """Steering and attribution of the run's colour features, into RUN/steering_summary.json (the sweeps
    into RUN/steering/select/ and RUN/steering/test/)."""
    from interp.shapes.world import WorldConfig
    from saes.recovery import recovery_of
    from steering.steer import load_setup

    layout = RunLayout.of(run)
    setup = load_setup(layout, device=device)
    colours = [m for m in recovery_of(layout, setup.sae).concepts if m.concept in WorldConfig().colors]
    base = SweepSpec(mode="clamp", unit="max", positions=positions,
                     features=[FeatureEntry(m.feature, m.concept) for m in colours], strengths=list(strengths),
                     world=WorldItems("color", n_select, "val"), max_new_tokens=4, batch_size=batch_size,
                     engine=engine)
    select = run_sweep(base, layout, "select", setup, progress)
    chosen = {b["feature"]: b for b in select.best}
    picked = [FeatureEntry(m.feature, m.concept, (chosen[m.feature]["strength"],)) for m in colours
              if chosen[m.feature]["strength"] is not None]
    flip = {}
    if picked:
        test = run_sweep(replace(base, features=picked, world=WorldItems("color", n_eval, "test")), layout, "test",
                         setup, progress)
        for r in test.rows:
            flip[r["concept"]] = {"feature": r["feature"], "strength_x_max": r["strength"], "value": r["value"],
                                  "flip_rate": r["target_rate"], "n": r["n_target"], "coherence": r["coherence"],
                                  "kl": r["kl"], "f1": next(m.f1 for m in colours if m.feature == r["feature"])}
    hits = sum(round(v["flip_rate"] * v["n"]) for v in flip.values() if v["flip_rate"] is not None)
    total = sum(v["n"] for v in flip.values())
    result = {
        "sae": str(layout.sae), "features": str(layout.features), "model": setup.lm.name, "layer": setup.hook.name,
        "module_path": setup.hook.module_path, "positions": positions, "mode": "clamp", "unit": "max",
        "selection": {"split": "val", "n": n_select, "strengths": list(strengths),
                      "best": {b["concept"]: b for b in select.best}, "sweep": str(select.out)},
        "flip": {"split": "test", "n_questions": n_eval, "per_colour": flip,
                 "overall": hits / total if total else None, "n": total,
                 "colours_without_a_coherent_strength": [m.concept for m in colours if chosen[m.feature]["strength"]
                                                         is None]},
        "attribution": attribution_targets(setup, colours, n_attr, ig_steps, batch_size, progress),
        "reach": image_token_reach(setup, n_attr, batch_size),
    }
    result["targets"] = {"flip_rate>=0.8": bool(result["flip"]["overall"] is not None
                                                 and result["flip"]["overall"] >= 0.8)}
    for name, v in result["attribution"].items():
        if isinstance(v, dict) and "top5_rate" in v:
            result["targets"][f"attribution_top5>=0.8 ({name})"] = v["top5_rate"] >= 0.8
    write_json(layout.steering_summary, result, indent=1, default=str)
    return result


def _colour_batches(setup, n: int, batch_size: int, split: str = "test"):
    from interp.shapes.organisms.eval import world_items
    from steering.steer import Query, prepare

    items = world_items("color", n, split)
    for s in range(0, len(items), batch_size):
        part = items[s: s + batch_size]
        yield part, prepare(setup.lm, [Query(qa.question, scene.render(), f"shapes:{split}:{scene.index}:0")
                                       for scene, qa in part])


def attribution_targets(setup, colours, n: int, ig_steps: int, batch_size: int, progress: bool = True) -> dict:
    """Top-5 rate of the true colour's feature and rank correlation with real ablations, for attribution
    patching (one step) and, when ig_steps > 1, integrated gradients."""
    from tqdm import tqdm

    from steering.attribution import ablation_effects, attribute, spearman
    from steering.steer import next_token_logits

    tok = setup.lm.tokenizer
    feature_of = {m.concept: m.feature for m in colours}
    colour_ids = torch.tensor([tok.convert_tokens_to_ids(c) for c in feature_of])
    methods = {"patching": 1, **({f"integrated_gradients_{ig_steps}": ig_steps} if ig_steps > 1 else {})}
    stats = {k: {"ranks": [], "rho": [], "rho_position": [], "pred": [], "true": []} for k in methods}
    bar = tqdm(total=n, desc="attribution", disable=not progress, mininterval=1)
    for part, batch in _colour_batches(setup, n, batch_size):
        logits = next_token_logits(setup, batch)[:, colour_ids]
        answers, baselines = [], []
        for i, (_, qa) in enumerate(part):
            other = logits[i].clone()
            other[list(feature_of).index(qa.answer)] = -float("inf")
            answers.append(int(colour_ids[list(feature_of).index(qa.answer)]))
            baselines.append(int(colour_ids[int(other.argmax())]))
        for name, steps in methods.items():
            atts = attribute(setup, batch, answers, baselines, "image", steps=steps)
            st = stats[name]
            for i, (a, (_, qa)) in enumerate(zip(atts, part)):
                st["ranks"].append(a.rank_of(feature_of[qa.answer]))
                pred, true = ablation_effects(setup, batch, i, a)
                st["rho"].append(spearman(pred, true))
                st["pred"] += pred.tolist()
                st["true"] += true.tolist()
                if steps == 1:
                    pp, tp = ablation_effects(setup, batch, i, a, per_position=True)
                    st["rho_position"].append(spearman(pp, tp))
        bar.update(len(part))
    bar.close()
    out = {"split": "test", "n": n, "answer": "the true colour", "baseline": "the most likely other colour",
           "positions": "image", "ranking": "total over positions, signed"}
    for name, st in stats.items():
        ranks = st["ranks"]
        rho, rho_p = np.array(st["rho"], float), np.array(st["rho_position"], float)
        out[name] = {"steps": methods[name],
                     "top5_rate": float(np.mean([r is not None and r <= 5 for r in ranks])),
                     "top1_rate": float(np.mean([r == 1 for r in ranks])),
                     "median_rank": float(np.median([r if r is not None else np.inf for r in ranks])),
                     "inactive_rate": float(np.mean([r is None for r in ranks])),
                     "spearman_per_image_mean": float(np.nanmean(rho)) if np.isfinite(rho).any() else None,
                     "spearman_per_image_median": float(np.nanmedian(rho)) if np.isfinite(rho).any() else None,
                     "spearman_pooled": spearman(np.array(st["pred"]), np.array(st["true"])),
                     "max_abs_true_effect": float(np.max(np.abs(st["true"]))) if st["true"] else None}
        if len(rho_p):
            out[name]["spearman_per_position_mean"] = float(np.nanmean(rho_p)) if np.isfinite(rho_p).any() else None
    return out


@torch.no_grad()
def image_token_reach(setup, n: int, batch_size: int) -> dict:
    """Share of colour answers that change when the layer's image-token rows come from the next image instead."""
    from interp.model.hooks import patch_output
    from steering.steer import next_token_logits

    changed = []
    for part, batch in _colour_batches(setup, n, batch_size):
        mask = batch.masks["image"].to(setup.lm.device)
        counts = mask.sum(1)
        if len(part) < 2 or not bool((counts == counts[0]).all()):
            continue

        def swap(out: torch.Tensor) -> torch.Tensor:
            if tuple(out.shape[:2]) != tuple(mask.shape):
                return out
            rows = out[mask].reshape(len(part), int(counts[0]), -1)  # each image's patch rows, in order
            return out.index_put((mask,), rows.roll(-1, 0).reshape(-1, out.shape[-1]))

        clean = next_token_logits(setup, batch).argmax(-1)
        with patch_output(setup.lm.model, setup.hook.module_path, swap):
            swapped = next_token_logits(setup, batch).argmax(-1)
        changed += (clean != swapped).tolist()
    return {"what": "share of answers that change when this layer's image-token activations are replaced by "
                    "the next image's", "answers_changed": float(np.mean(changed)) if changed else None,
            "n": len(changed)}
