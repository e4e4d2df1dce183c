"""`interp steer-targets`: steering and attribution with the run's own SAE, at its own layer, measured
against the shapes world's ground truth.

For each kind of concept steered (`color`, `shape`), the features are the recovery report's
(RUN/recovery.json) best features of the kind's concepts (`color:red`, `shape:letter e`, ...).
Every concept is steered with its feature; a feature that several concepts share (a poorly
recovered colour whose best feature is another colour's) runs once per concept, in sweeps of
its own (`-2`, `-3` after the sweep name), so each concept's flip rate counts.

1. Selection: sweeps clamping each feature, in multiples of its max activation, at each candidate
   positions, on validation questions of the kind's task ("what color is the <shape> ?", "what
   shape is the <colour> object ?"); each feature keeps the positions and strength with the highest
   target rate among the coherent ones (steering.sweep.best_strengths).
2. Flip rate at those positions and strengths on test questions (other scenes; nothing is tuned on them) whose
   answer is another value: the share whose answer becomes the feature's value.
3. Attribution on test questions (answer: the true value's first token; baseline: the most
   likely other value with another first token): how often the true value's feature is in the
   top 5 of the features at the image positions, ranked by attribution patching and by integrated
   gradients, and the rank correlation of the attribution with measured ablations.
4. Reach: the share of answers that change when this layer's image tokens are swapped with another
   image's (interp.shapes.organisms.eval.image_token_reach). Near zero means the model has read the
   image before this layer, so no image-token feature here can steer an answer.

Where to clamp was chosen by measurement: each feature picks "image" (every image patch) or "all"
(every prompt token and every generated one) on the validation questions. On shapes-subject v2 at
layer 4 (a batchtopk SAE of 256 features, k 4, on 1500 samples), clamping each colour feature on 40
validation questions flipped, pooled over the colours with a feature of their own, at the best of
1, 2, 4, 8 x max: image patches 0.91 (4x), the named object's patches ("object") 0.50, the
question's text 0.16 (coherence falls to 0.37 at 4x), "all" 0.91 at 1x but 0.18 at 4x (coherence
0.18); shapes 0.30, 0.18, text not run, "all" 0.21. "image" wins for most features, but "all" at 1x
is the better choice for some (blue, whose feature the SAE shares with purple: 0.94 against 0.47),
hence the per-feature choice. The object's own patches are not enough because image tokens after
it in raster order (causal attention) have already read its colour by layer 4. Zeroing the kind's
other features along with the clamp ("swap") added at most 0.03 at the chosen strength, so the
clamp stays alone.
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
DEFAULT_POSITIONS = ("image", "all")  # measured: see the module docstring
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


def feature_rounds(matches: list) -> list[list]:
    """`matches` in rounds in which no feature appears twice (best F1 first): a concept that shares its best
    feature with another is steered in a later round, with the same feature."""
    rounds: list[list] = []
    for m in sorted(matches, key=lambda m: -m.f1):
        free = next((g for g in rounds if all(o.feature != m.feature for o in g)), None)
        if free is None:
            rounds.append(free := [])
        free.append(m)
    return rounds


def shapes_targets(run: str | Path | RunLayout, *, kinds: tuple[str, ...] = KINDS, n_select: int = 40,
                   n_eval: int = 100, n_attr: int = 60, n_validate: int = 12,
                   strengths: tuple[float, ...] = DEFAULT_STRENGTHS,
                   positions: str | tuple[str, ...] = DEFAULT_POSITIONS,
                   ig_steps: int = 4, engine: str = "torch", batch_size: int = 50, seed: int = 0,
                   reach_questions: int = 60, max_new_tokens: int = MAX_NEW_TOKENS, device: str = "auto",
                   progress: bool = True) -> dict:
    """Steering and attribution of the run's colour and shape features at the SAE's own layer, into
    RUN/steering_summary.json (the sweeps into RUN/steering/select-KIND-POSITIONS/ and test-KIND-POSITIONS/).
    `positions`: where to clamp, or candidates each feature chooses from (with its strength) by its flips on
    the validation questions (ties: the earlier candidate, then the smaller strength)."""
    from saes.recovery import recovery_of
    from steering.steer import load_setup

    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise TargetsError(f"unknown kinds {unknown}; steer-targets measures {', '.join(KINDS)}")
    layout = RunLayout.of(run)
    report = recovery_of(layout)  # bad input (no concepts of a kind) stops here, before the model loads
    matches = {kind: kind_matches(report, kind) for kind in kinds}
    setup = load_setup(layout, device=device)
    cands = (positions,) if isinstance(positions, str) else tuple(positions)
    if not cands:
        raise TargetsError("give at least one positions to clamp at")
    selection, flip = {}, {"split": "test", "n_questions": n_eval}
    for kind, (own, shared) in matches.items():
        mine = own + [report.match(c) for c in shared]
        best, by_positions, per, chosen_none, tests, sweeps = {}, {p: {} for p in cands}, {}, [], [], []
        for r, group in enumerate(feature_rounds(mine)):  # a sweep keys generations by feature: one concept each
            suffix = f"-{r + 1}" if r else ""
            base = SweepSpec(mode="clamp", unit="max", positions=cands[0], features=[], strengths=list(strengths),
                             world=WorldItems(kind, n_select, "val", seed), max_new_tokens=max_new_tokens,
                             batch_size=batch_size, engine=engine, perplexity=False)
            picks: dict[str, list] = {p: [] for p in cands}
            rows = {}
            for p in cands:
                spec = replace(base, positions=p, features=[FeatureEntry(m.feature, m.concept) for m in group])
                select = run_sweep(spec, layout, f"select-{kind}-{p}{suffix}", setup, progress)
                sweeps.append(str(select.out))
                for b in select.best:
                    by_positions[p][b["concept"]] = b
                    rows.setdefault(b["concept"], []).append((p, b))
            for m in group:  # the positions and strength with the most flips on the validation questions
                ok = [(p, b) for p, b in rows[m.concept] if b["strength"] is not None]
                if not ok:
                    chosen_none.append(m.concept)
                    best[m.concept] = rows[m.concept][0][1]
                    continue
                p, b = max(ok, key=lambda pb: (pb[1]["target_rate"], -cands.index(pb[0])))
                best[m.concept] = {**b, "positions": p}
                picks[p].append(FeatureEntry(m.feature, m.concept, (b["strength"],)))
            f1 = {m.concept: m.f1 for m in group}
            for p, picked in picks.items():
                if not picked:
                    continue
                test = run_sweep(replace(base, positions=p, features=picked, world=WorldItems(kind, n_eval, "test",
                                                                                             seed)),
                                 layout, f"test-{kind}-{p}{suffix}", setup, progress)
                tests.append(test.out)
                for row in test.rows:
                    per[row["concept"]] = {"feature": row["feature"], "positions": p, "strength_x_max": row["strength"],
                                           "value": row["value"], "flip_rate": row["target_rate"],
                                           "n": row["n_target"], "hits": row["hits"], "changed": row["changed"],
                                           "coherence": row["coherence"], "kl": row["kl"], "f1": f1[row["concept"]],
                                           "shares_feature_with": [o.concept for o in mine if o.feature ==
                                                                   row["feature"] and o.concept != row["concept"]]}
        selection[kind] = {"split": "val", "n": n_select, "strengths": list(strengths), "positions": list(cands),
                           "best": best, "by_positions": by_positions, "sweeps": sweeps}
        hits = sum(v.get("hits", 0) for v in per.values())
        total = sum(v["n"] for v in per.values())
        flip[kind] = {"per_concept": per, "overall": hits / total if total else None, "n": total,
                      "baseline_accuracy": _baseline_accuracy(tests[0]) if tests else None,
                      "without_a_coherent_strength": chosen_none, "sharing_a_feature": shared}
    attribution = attribution_targets(setup, {k: m[0] + [report.match(c) for c in m[1]] for k, m in matches.items()},
                                      n_attr, ig_steps, batch_size,
                                      n_validate=n_validate, seed=seed, progress=progress)
    result = {
        "sae": str(layout.sae), "features": str(layout.features), "model": setup.lm.name, "layer": setup.hook.name,
        "module_path": setup.hook.module_path, "sae_layer": sae_layer(setup), "steering_layer": setup.hook.index,
        "positions": list(cands), "mode": "clamp", "unit": "max", "selection": selection, "flip": flip,
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
