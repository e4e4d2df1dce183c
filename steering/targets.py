"""`interp steer-targets`: steering and attribution with the run's own SAE, at its own layer, measured
against the shapes world's ground truth.

For each kind of concept steered (`color`, `shape`), the features are the recovery report's
(RUN/recovery.json) best features of the kind's concepts (`color:red`, `shape:letter e`, ...);
a feature that several concepts share steers the one it matches best.

1. Strength selection: a sweep clamping each feature, in multiples of its max activation, on
   validation questions of the kind's task ("what color is the <shape> ?", "what shape is the
   <colour> object ?"); each feature keeps the strength with the highest target rate among the
   coherent ones (steering.sweep.best_strengths).
2. Flip rate at those strengths on test questions (other scenes; nothing is tuned on them) whose
   answer is another value: the share whose answer becomes the feature's value.
3. Attribution on test questions (answer: the true value's first token; baseline: the most
   likely other value with another first token): how often the true value's feature is in the
   top 5 of the features at the image positions, ranked by attribution patching and by integrated
   gradients, and the rank correlation of the attribution with measured ablations.
4. Reach: the share of answers that change when this layer's image tokens are swapped with another
   image's (interp.shapes.organisms.eval.image_token_reach). Near zero means the model has read the
   image before this layer, so no image-token feature here can steer an answer.

Where to clamp: `positions` (default "object", the image patches of the object the question names).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from interp.infra.durable import write_json
from interp.infra.layout import RunLayout
from steering.sweep import FeatureEntry, SweepSpec, WorldItems, answer_word, run_sweep

KINDS = ("color", "shape")  # concept kinds steered; each is also the world task whose answer it is
DEFAULT_STRENGTHS = (1.0, 2.0, 4.0)
DEFAULT_POSITIONS = "object"
MAX_NEW_TOKENS = 3  # "letter e" and the end of the answer


class TargetsError(ValueError):
    """A run that steer-targets cannot measure (no concept of a kind, a task without answers)."""


def kind_matches(report, kind: str) -> tuple[list, list[str]]:
    """(the ConceptMatches of `kind` with a feature of their own, the concepts whose best feature another
    concept of the kind matches better). A KeyError-free TargetsError when the kind has no concept."""
    mine = [m for m in report.concepts if m.concept.startswith(f"{kind}:")]
    if not mine:
        kinds = sorted({m.concept.split(":", 1)[0] for m in report.concepts if ":" in m.concept})
        raise TargetsError(f"the recovery report has no {kind!r} concepts (kind:value names); its kinds: "
                           f"{', '.join(kinds) or 'none'}: re-run `interp recovery RUN` on a shapes-world cache")
    best = {}
    for m in sorted(mine, key=lambda m: -m.f1):
        best.setdefault(m.feature, m)
    own = [m for m in mine if best[m.feature] is m]
    return own, [m.concept for m in mine if best[m.feature] is not m]


def shapes_targets(run: str | Path | RunLayout, *, kinds: tuple[str, ...] = KINDS, n_select: int = 40,
                   n_eval: int = 100, n_attr: int = 60, n_validate: int = 12,
                   strengths: tuple[float, ...] = DEFAULT_STRENGTHS, positions: str = DEFAULT_POSITIONS,
                   ig_steps: int = 4, engine: str = "torch", batch_size: int = 50, seed: int = 0,
                   reach_questions: int = 60, max_new_tokens: int = MAX_NEW_TOKENS, device: str = "auto",
                   progress: bool = True) -> dict:
    """Steering and attribution of the run's colour and shape features at the SAE's own layer, into
    RUN/steering_summary.json (the sweeps into RUN/steering/select-KIND-POSITIONS/ and test-KIND-POSITIONS/)."""
    from saes.recovery import recovery_of
    from steering.steer import load_setup

    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise TargetsError(f"unknown kinds {unknown}; steer-targets measures {', '.join(KINDS)}")
    layout = RunLayout.of(run)
    report = recovery_of(layout)  # bad input (no concepts of a kind) stops here, before the model loads
    matches = {kind: kind_matches(report, kind) for kind in kinds}
    setup = load_setup(layout, device=device)
    selection, flip = {}, {"split": "test", "n_questions": n_eval}
    for kind, (own, shared) in matches.items():
        base = SweepSpec(mode="clamp", unit="max", positions=positions,
                         features=[FeatureEntry(m.feature, m.concept) for m in own], strengths=list(strengths),
                         world=WorldItems(kind, n_select, "val", seed), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, engine=engine, perplexity=False)
        select = run_sweep(base, layout, f"select-{kind}-{positions}", setup, progress)
        chosen = {b["feature"]: b for b in select.best}
        picked = [FeatureEntry(m.feature, m.concept, (chosen[m.feature]["strength"],)) for m in own
                  if chosen[m.feature]["strength"] is not None]
        selection[kind] = {"split": "val", "n": n_select, "strengths": list(strengths),
                           "best": {b["concept"]: b for b in select.best}, "sweep": str(select.out)}
        per = {}
        test = None
        if picked:
            test = run_sweep(replace(base, features=picked, world=WorldItems(kind, n_eval, "test", seed)), layout,
                             f"test-{kind}-{positions}", setup, progress)
            f1 = {m.feature: m.f1 for m in own}
            for r in test.rows:
                per[r["concept"]] = {"feature": r["feature"], "strength_x_max": r["strength"], "value": r["value"],
                                     "flip_rate": r["target_rate"], "n": r["n_target"], "changed": r["changed"],
                                     "coherence": r["coherence"], "kl": r["kl"], "f1": f1[r["feature"]]}
        hits = sum(round(v["flip_rate"] * v["n"]) for v in per.values() if v["flip_rate"] is not None)
        total = sum(v["n"] for v in per.values())
        flip[kind] = {"per_concept": per, "overall": hits / total if total else None, "n": total,
                      "baseline_accuracy": _baseline_accuracy(test.out) if test else None,
                      "without_a_coherent_strength": [m.concept for m in own if chosen[m.feature]["strength"] is None],
                      "sharing_a_feature": shared}
    attribution = attribution_targets(setup, {k: m[0] for k, m in matches.items()}, n_attr, ig_steps, batch_size,
                                      n_validate=n_validate, seed=seed, progress=progress)
    result = {
        "sae": str(layout.sae), "features": str(layout.features), "model": setup.lm.name, "layer": setup.hook.name,
        "module_path": setup.hook.module_path, "sae_layer": sae_layer(setup), "steering_layer": setup.hook.index,
        "positions": positions, "mode": "clamp", "unit": "max", "selection": selection, "flip": flip,
        "attribution": attribution, "reach": image_token_reach(setup, reach_questions, kinds, seed),
    }
    result["targets"] = {f"flip_rate>=0.8 ({kind})": bool(flip[kind]["overall"] is not None
                                                          and flip[kind]["overall"] >= 0.8) for kind in kinds}
    for kind, methods in attribution.items():
        for name, v in methods.items():
            if isinstance(v, dict) and "top5_rate" in v:
                result["targets"][f"attribution_top5>=0.8 ({kind}, {name})"] = v["top5_rate"] >= 0.8
    write_json(layout.steering_summary, result, indent=1, default=str)
    return result


def sae_layer(setup) -> int | None:
    """The layer index the SAE says it was trained on (cfg.hook_layer, else its hook's), for the summary."""
    layer = setup.sae.cfg.hook_layer
    return int(layer) if layer is not None else setup.hook.index


def headline(result: dict) -> dict:
    """The steering keys of the demo's summary.json, from a steering summary."""
    flip, attr = result["flip"], result["attribution"]
    colour = attr.get("color", {})
    ig = next((v for k, v in colour.items() if k.startswith("integrated_gradients")), None)
    rnd = lambda v: round(v, 4) if v is not None else None  # noqa: E731
    return {"sae_layer": result["sae_layer"], "steering_layer": result["steering_layer"],
            "steering_positions": result["positions"],
            "steering_success": rnd(flip.get("color", {}).get("overall")),
            "steering_success_shape": rnd(flip.get("shape", {}).get("overall")),
            "attribution_top5": rnd((ig or colour.get("patching") or {}).get("top5_rate")),
            "attribution_top5_patching": rnd(colour.get("patching", {}).get("top5_rate")),
            "attribution_top5_shape": rnd(next((v for k, v in attr.get("shape", {}).items()
                                                if k.startswith("integrated_gradients")),
                                               attr.get("shape", {}).get("patching", {})).get("top5_rate"))}


def _baseline_accuracy(sweep_dir: Path) -> float | None:
    """Share of the sweep's unsteered answers that are right (the flip rate counts against the truth)."""
    from interp.infra.layout import SweepDir
    from interp.infra.records import read_records

    base = [r for r in read_records(SweepDir(Path(sweep_dir)).generations) if r.get("kind") == "baseline"]
    return float(np.mean([r["output"] == r["truth"] for r in base])) if base else None


def _batches(setup, task: str, n: int, batch_size: int, split: str = "test", seed: int = 0):
    from interp.shapes.organisms.eval import world_items
    from steering.steer import Query, prepare, question_region

    items = world_items(task, n, split, seed)
    for s in range(0, len(items), batch_size):
        part = items[s: s + batch_size]
        queries = []
        for scene, qa in part:
            ref = f"shapes:{split}:{scene.index}:{seed}"
            queries.append(Query(qa.question, scene.render(), ref, question_region(ref, qa.question, scene)))
        yield part, prepare(setup.lm, queries)


def first_token(tokenizer, text: str) -> int:
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])


def attribution_targets(setup, matches: dict[str, list], n: int, ig_steps: int, batch_size: int,
                        n_validate: int = 12, seed: int = 0, progress: bool = True) -> dict:
    """Per kind: the top-5 rate of the true value's feature among the features at the image positions, for
    attribution patching (one step) and, when ig_steps > 1, integrated gradients; and, on the first
    `n_validate` questions, the rank correlation of the attribution with real ablations of every active
    feature (the same ablations serve both methods)."""
    from tqdm import tqdm

    from steering.attribution import ablation_effects, attribute, spearman

    tok = setup.lm.tokenizer
    methods = {"patching": 1, **({f"integrated_gradients_{ig_steps}": ig_steps} if ig_steps > 1 else {})}
    out = {}
    for kind, own in matches.items():
        feature_of = {answer_word(m.concept): m.feature for m in own}
        values = list(feature_of)
        ids = torch.tensor([first_token(tok, v) for v in values])
        stats = {k: {"ranks": [], "rho": [], "pred": [], "true": []} for k in methods}
        validated = 0
        bar = tqdm(total=n, desc=f"attribution {kind}", disable=not progress, mininterval=1)
        for part, batch in _batches(setup, kind, n, batch_size, seed=seed):
            from steering.steer import next_token_logits

            logits = next_token_logits(setup, batch)
            answers, baselines, keep = [], [], []
            for i, (_, qa) in enumerate(part):
                if qa.answer not in feature_of:  # a value without a feature of its own
                    answers.append(None)
                    baselines.append(None)
                    continue
                a = int(ids[values.index(qa.answer)])
                others = [int(t) for t in ids if int(t) != a]
                answers.append(a)
                baselines.append(max(others, key=lambda t: float(logits[i, t])) if others else None)
                keep.append(i)
            if not keep:
                bar.update(len(part))
                continue
            atts = {name: attribute(setup, batch, answers, baselines, "image", steps=steps)
                    for name, steps in methods.items()}
            for i in keep:
                qa = part[i][1]
                true = None
                if validated < n_validate:
                    ref = atts["patching"][i]
                    _, true = ablation_effects(setup, batch, i, ref)
                    validated += 1
                for name in methods:
                    a = atts[name][i]
                    st = stats[name]
                    st["ranks"].append(a.rank_of(feature_of[qa.answer]))
                    if true is not None:
                        pred = -a.total()[a.active_features()]
                        st["rho"].append(spearman(pred, true))
                        st["pred"] += pred.tolist()
                        st["true"] += true.tolist()
            bar.update(len(part))
        bar.close()
        out[kind] = {"split": "test", "n": n, "answer": f"the true {kind}'s first token",
                     "baseline": f"the most likely other {kind} with another first token", "positions": "image",
                     "ranking": "total over positions, signed", "validated": validated}
        for name, st in stats.items():
            ranks = st["ranks"]
            rho = np.array(st["rho"], float)
            out[kind][name] = {
                "steps": methods[name], "n": len(ranks),
                "top5_rate": float(np.mean([r is not None and r <= 5 for r in ranks])) if ranks else None,
                "top1_rate": float(np.mean([r == 1 for r in ranks])) if ranks else None,
                "median_rank": float(np.median([r if r is not None else np.inf for r in ranks])) if ranks else None,
                "inactive_rate": float(np.mean([r is None for r in ranks])) if ranks else None,
                "spearman_per_image_mean": float(np.nanmean(rho)) if np.isfinite(rho).any() else None,
                "spearman_per_image_median": float(np.nanmedian(rho)) if np.isfinite(rho).any() else None,
                "spearman_pooled": spearman(np.array(st["pred"]), np.array(st["true"])),
                "max_abs_true_effect": float(np.max(np.abs(st["true"]))) if st["true"] else None}
    return out


@torch.no_grad()
def image_token_reach(setup, n: int, kinds: tuple[str, ...] = KINDS, seed: int = 0) -> dict:
    """Share of answers (of the kinds' tasks) that change when the layer's image-token rows come from another
    image whose answer differs (interp.shapes.organisms.eval.image_token_reach)."""
    from interp.shapes.organisms import eval as organism_eval

    lm = setup.lm
    if lm.processor is None or n < 1:
        return {"what": "not measured", "answers_changed": None, "n": 0, "tasks": list(kinds)}
    changed = organism_eval.image_token_reach(lm.model, lm.processor, setup.hook.index, n=n, split="test", seed=seed,
                                              tasks=tuple(kinds))
    return {"what": "share of answers that change when this layer's image-token activations are replaced by "
                    "those of an image with another answer", "answers_changed": None if np.isnan(changed)
            else float(changed), "n": n, "tasks": list(kinds)}
