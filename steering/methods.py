"""Steering methods side by side (issue 16): the project's feature edit against the reference method,
the LMMs-Lab Multimodal-SAE's steering, on the shapes world's exact answers.

- reference: in the prompt's forward, the feature's encoder pre-activation is set to a value at every
  prompt position and top-k is re-applied; in every forward the layer output becomes the SAE's
  reconstruction, error term dropped (steering.interventions: mode "clamp-pre" at positions "prompt",
  splice=True; where it comes from is said there).
- reference-error-kept: the reference's clamp with the error term kept and no splice, to tell its two
  parts apart: splicing an SAE trained on image tokens in at every token breaks the model by itself.
- ours: the post-activation edit with the error term kept, as each of VARIANTS (clamp or add; image,
  all or text positions); `ours` is, per kind of concept, the variant with the highest flip rate on
  the validation questions.

Every method steers each concept of a kind with the recovery report's feature for it (as
steering/targets.py does: `kind_matches`, `feature_rounds`), its strength, in multiples of the
feature's max activation, picked on validation questions (split "val") by the sweep's rule
(steering.sweep.best_strengths: the highest target rate among coherent outputs). On test questions
(split "test", nothing tuned there) each method is measured by
- flip_rate: the share of questions whose true answer is another value that the steering turns
  into the feature's value, pooled over the kind's concepts; a concept for which a method has no
  coherent strength counts as no flips on its questions (targets.py leaves it out: here a method
  must not gain from failing);
- collateral (= collateral_accuracy_drop): accuracy on questions about the same images' other
  attributes (COLLATERAL_TASKS) unsteered minus steered, and collateral_kl: the mean KL(unsteered ||
  steered) of those questions' next-token distribution;
- coherence: the share of steered test answers that are valid answers (steering.sweep.coherent).
Everything is a resumable sweep of steering.sweep in RUN/steering/methods-{select,test,collateral}-*.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from interp.infra.layout import RunLayout
from steering.sweep import FeatureEntry, SweepSpec, WorldItems, items_for, record_key, run_sweep
from steering.targets import KINDS, MAX_NEW_TOKENS, feature_rounds, kind_matches


# questions about the steered images whose answers do not depend on the steered kind: "what is at P ?" is
# scored on its other words ("small striped red circle" -> "small striped circle" when steering colour);
# size, fill and where questions name their object by its shape, so they stay out of the shape kind's.
COLLATERAL_TASKS = {"color": ("size", "fill", "where", "count", "at"), "shape": ("count", "at")}
ANSWER_TOKENS = {"at": 8}  # "large striped purple letter k" and its end; the other answers fit in MAX_NEW_TOKENS
BATCH = 64  # a validation or test sweep's questions in one batch
COUNTS = ("hits", "n", "coherent", "outputs", "kl_sum", "kl_n", "val_hits", "val_n",
          "coll_unsteered", "coll_steered", "coll_n", "coll_kl_sum", "coll_kl_n")


@dataclass(frozen=True)
class Method:
    """How a method edits the SAE's layer (steering.interventions.FeatureEdit's settings)."""

    mode: str
    positions: str
    keep_error: bool = True
    splice: bool = False

    def spec(self, features: list[FeatureEntry], world: WorldItems, strengths) -> SweepSpec:
        return SweepSpec(features=features, strengths=list(strengths), mode=self.mode, unit="max",
                         positions=self.positions, world=world, batch_size=BATCH,
                         max_new_tokens=ANSWER_TOKENS.get(world.task, MAX_NEW_TOKENS),
                         engine="torch", keep_error=self.keep_error, splice=self.splice, perplexity=False,
                         figure=False)  # dozens of small sweeps a kind: 4.7 MB and ~1 s of figure each

    def to_json(self) -> dict:
        return {"mode": self.mode, "unit": "max", "positions": self.positions, "keep_error": self.keep_error,
                "splice": self.splice}


REFERENCE = Method("clamp-pre", "prompt", keep_error=False, splice=True)
REFERENCE_VARIANTS = {"reference-error-kept": Method("clamp-pre", "prompt")}
VARIANTS = {"clamp-image": Method("clamp", "image"), "add-image": Method("add", "image"),
            "clamp-all": Method("clamp", "all"), "clamp-text": Method("clamp", "text")}  # ties: the earlier


def steering_methods(run: str | Path | RunLayout, kinds: tuple[str, ...] = ("color",), n_questions: int = 60,
                     strengths: tuple[float, ...] = (1.0, 2.0, 4.0), seed: int = 0, progress: bool = False) -> dict:
    """The reference method and our variants on the run's SAE at its own layer, per kind of concept:
    strengths chosen on n_questions // 2 validation questions, measured on `n_questions` test questions
    and, for collateral damage, on about n_questions questions of other tasks about the same images.
    Returns {"ours", "reference", "variants", "reference_variants", "target", ...}: each method pooled over
    the kinds, with "per_kind" and "per_concept" details; "ours"["variant"] names each kind's variant."""
    from saes.recovery import recovery_of
    from steering.interventions import check_strength
    from steering.steer import load_setup

    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {unknown or list(kinds)}; steering_methods steers {', '.join(KINDS)}")
    if isinstance(n_questions, bool) or int(n_questions) != n_questions or n_questions < 2:
        raise ValueError(f"n_questions must be an integer of at least 2 (half as many validate), got {n_questions!r}")
    strengths = tuple(check_strength(s, "steering_methods strength") for s in strengths)
    if not strengths:
        raise ValueError("give at least one strength (in multiples of the feature's max activation)")
    layout = RunLayout.of(run)
    if not layout.features.exists():
        raise ValueError(f"steering_methods gives strengths in multiples of each feature's max activation, which "
                         f"needs {layout.features}: run `interp features {layout.root}` first")
    report = recovery_of(layout)  # bad input (no concepts of a kind) stops here, before the model loads
    matches = {kind: kind_matches(report, kind) for kind in kinds}
    setup = load_setup(layout)
    n_val, methods = max(1, n_questions // 2), {"reference": REFERENCE, **REFERENCE_VARIANTS, **VARIANTS}
    per_kind = {}
    for kind, (own, shared) in matches.items():
        concepts = own + [report.match(c) for c in shared]
        per_kind[kind] = {name: measure(setup, layout, name, method, kind, concepts, strengths, n_val, n_questions,
                                        seed, progress) for name, method in methods.items()}
    chosen = {kind: max(VARIANTS, key=lambda v: (m[v]["validation_flip_rate"] or 0.0, -list(VARIANTS).index(v)))
              for kind, m in per_kind.items()}
    pooled = {name: pool(method, {kind: per_kind[kind][name] for kind in kinds}) for name, method in methods.items()}
    ours = {**pool(None, {kind: per_kind[kind][chosen[kind]] for kind in kinds}), "variant": chosen}
    result = {"model": setup.lm.name, "layer": setup.hook.name, "module_path": setup.hook.module_path,
              "sae": str(layout.sae), "kinds": list(kinds), "strengths_x_max": list(strengths),
              "n_questions": n_questions, "n_validation": n_val, "seed": seed, "strengths_chosen_on": "val",
              "measured_on": "test", "collateral_tasks": {k: list(COLLATERAL_TASKS[k]) for k in kinds},
              "ours": ours, "reference": pooled["reference"],
              "variants": {name: pooled[name] for name in VARIANTS},
              "reference_variants": {name: pooled[name] for name in REFERENCE_VARIANTS}}
    result["target"] = {**target(ours, pooled["reference"]),
                        "per_kind": {k: target(ours["per_kind"][k], pooled["reference"]["per_kind"][k]) for k in kinds}}
    return result


def measure(setup, layout: RunLayout, name: str, method: Method, kind: str, concepts: list, strengths, n_val: int,
            n_test: int, seed: int, progress: bool) -> dict:
    """One method on one kind's concepts: strengths on validation questions, then flips and collateral damage
    on test questions (sweeps RUN/steering/methods-{select,test,collateral}-KIND[-TASK]-NAME[-ROUND])."""
    from interp.shapes.organisms.eval import world_items
    from steering.sweep import answer_word

    truths = [qa.answer for _, qa in world_items(kind, n_test, "test", seed)]
    tasks = COLLATERAL_TASKS[kind]
    n_scenes = max(1, n_test // len(tasks))  # about n_test collateral questions in all
    counts, per, sweeps, without = Counter(), {}, [], []
    by_task, by_concept = {task: Counter() for task in tasks}, {}
    for r, group in enumerate(feature_rounds(concepts)):  # a sweep keys generations by feature: one concept each
        suffix = f"-{r + 1}" if r else ""
        select = run_sweep(method.spec([FeatureEntry(m.feature, m.concept) for m in group],
                                       WorldItems(kind, n_val, "val", seed), strengths),
                           layout, f"methods-select-{kind}-{name}{suffix}", setup, progress)
        sweeps.append(str(select.out))
        best = {b["concept"]: b for b in select.best}
        val_n = {row["concept"]: row["n_target"] for row in select.rows}
        picked = []
        for m in group:
            b = best[m.concept]
            val_hits = b["hits"] if b["strength"] is not None else 0
            counts.update(val_hits=val_hits, val_n=val_n[m.concept])
            per[m.concept] = {"feature": m.feature, "f1": m.f1, "strength_x_max": b["strength"],
                              "value": b.get("value"), "validation_flip_rate": val_hits / val_n[m.concept]
                              if val_n[m.concept] else None, "validation_n": val_n[m.concept]}
            if b["strength"] is None:  # no coherent strength: no flips on its test questions
                without.append(m.concept)
                n = sum(t != answer_word(m.concept) for t in truths)
                counts.update(n=n)
                per[m.concept].update(flip_rate=0.0 if n else None, n=n, note=b.get("reason"))
            else:
                picked.append(FeatureEntry(m.feature, m.concept, (b["strength"],)))
        if not picked:
            continue
        test = run_sweep(method.spec(picked, WorldItems(kind, n_test, "test", seed), strengths),
                         layout, f"methods-test-{kind}-{name}{suffix}", setup, progress)
        sweeps.append(str(test.out))
        for row in test.rows:
            counts.update(hits=row["hits"], n=row["n_target"], coherent=row["n_coherent"], outputs=row["n"])
            if row["kl"] is not None:
                counts.update(kl_sum=row["kl"] * row["n"], kl_n=row["n"])
            per[row["concept"]].update(flip_rate=row["target_rate"], n=row["n_target"], coherence=row["coherence"],
                                       kl=row["kl"], changed=row["changed"])
        for task in tasks:
            spec = method.spec(picked, WorldItems(task, n_scenes, "test", seed, scenes_of=kind), strengths)
            sweep = run_sweep(spec, layout, f"methods-collateral-{kind}-{task}-{name}{suffix}", setup, progress)
            sweeps.append(str(sweep.out))
            for concept, c in collateral(spec, sweep.out, kind).items():
                for tally in (counts, by_task[task], by_concept.setdefault(concept, Counter())):
                    tally.update(c)
    for concept, c in by_concept.items():
        per[concept].update(collateral_accuracy_drop=_drop(c), collateral_kl=_ratio(c, "coll_kl_sum", "coll_kl_n"))
    return {"method": method.to_json(), **summary(counts), "per_concept": per, "without_a_coherent_strength": without,
            "collateral_questions_per_task": n_scenes,
            "collateral_by_task": {task: {"accuracy_unsteered": _ratio(c, "coll_unsteered", "coll_n"),
                                          "accuracy_steered": _ratio(c, "coll_steered", "coll_n"),
                                          "accuracy_drop": _drop(c), "kl": _ratio(c, "coll_kl_sum", "coll_kl_n"),
                                          "n": c["coll_n"]} for task, c in by_task.items()},
            "counts": {k: counts[k] for k in COUNTS}, "sweeps": sweeps}


def collateral(spec: SweepSpec, sweep_dir: Path, kind: str) -> dict[str, Counter]:
    """Per steered concept, from a collateral sweep's records: right answers unsteered and steered, questions,
    and the KL of each steered question's next token (summed)."""
    from interp.infra.layout import SweepDir
    from interp.infra.records import read_records

    records = {r["key"]: r for r in read_records(SweepDir(Path(sweep_dir)).generations)}
    task = spec.world.task
    items = items_for(spec)
    base = [records[record_key(None, None, *it.key)] for it in items]
    right = sum(answered(r["output"], r["truth"], task, kind) for r in base)
    out = {}
    for e in spec.features:
        steered = [records[record_key(e.feature, s, *it.key)] for s in e.strengths for it in items]
        kls = [r["kl"] for r in steered if r["kl"] is not None]
        out[e.concept] = Counter(coll_unsteered=right * len(e.strengths), coll_n=len(steered), coll_kl_n=len(kls),
                                 coll_steered=sum(answered(r["output"], r["truth"], task, kind) for r in steered),
                                 coll_kl_sum=sum(kls))
    return out


def answered(output: str, truth: str, task: str, kind: str) -> bool:
    """Right about what the steering should leave alone: exact, but "what is at P ?" without the steered
    kind's word (its colour when steering colour), which the steering is meant to change."""
    if task != "at":
        return output == truth
    return _other_words(output, kind) == _other_words(truth, kind)


def _other_words(phrase: str, kind: str) -> str:
    from interp.shapes.world import phrase_attributes

    text = f" {' '.join(phrase.split())} "
    value = phrase_attributes(phrase).get(kind)
    return (text.replace(f" {value} ", " ", 1) if value else text).strip()


def _ratio(counts, num: str, den: str) -> float | None:
    return counts[num] / counts[den] if counts.get(den) else None


def _drop(counts) -> float | None:
    return (counts["coll_unsteered"] - counts["coll_steered"]) / counts["coll_n"] if counts.get("coll_n") else None


def summary(counts) -> dict:
    """The rates of a method from its counts (one kind's, or several kinds' added)."""
    drop = _drop(counts)
    return {"flip_rate": _ratio(counts, "hits", "n"), "collateral": drop, "collateral_accuracy_drop": drop,
            "collateral_kl": _ratio(counts, "coll_kl_sum", "coll_kl_n"), "coherence": _ratio(counts, "coherent",
                                                                                              "outputs"),
            "kl": _ratio(counts, "kl_sum", "kl_n"), "validation_flip_rate": _ratio(counts, "val_hits", "val_n"),
            "collateral_accuracy_unsteered": _ratio(counts, "coll_unsteered", "coll_n"),
            "collateral_accuracy_steered": _ratio(counts, "coll_steered", "coll_n"), "n": counts.get("n", 0),
            "collateral_n": counts.get("coll_n", 0)}


def pool(method: Method | None, per_kind: dict[str, dict]) -> dict:
    """A method's rates over several kinds (their counts added), with each kind's measurement."""
    counts = Counter()
    for m in per_kind.values():
        counts.update(m["counts"])
    return {**({"method": method.to_json()} if method else {}), **summary(counts), "per_kind": per_kind}


def target(ours: dict, reference: dict) -> dict:
    """Issue 16's target: ours flips at least as many answers as the reference at no more than half its
    collateral damage (accuracy drop on the other questions about the same images). A comparison with a
    rate that was not measured (the reference steers no concept of a kind coherently) is None."""
    def holds(a, b, op) -> bool | None:
        return None if a is None or b is None else bool(op(a, b))

    flips = holds(ours["flip_rate"], reference["flip_rate"], lambda a, b: a >= b)
    damage = holds(ours["collateral"], reference["collateral"], lambda a, b: a <= b / 2)
    met = False if False in (flips, damage) else None if None in (flips, damage) else True
    return {"flip_rate>=reference": flips, "collateral<=reference/2": damage, "met": met}
