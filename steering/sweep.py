"""`interp sweep`: features × strengths × prompts × images, every generation recorded.

The spec (YAML or JSON) names the SAE, the features (by index, or by concept through
the run's recovery report), strengths, how and where to steer, and the inputs: explicit
`prompts` × `images`, or `world` questions of the shapes world (whose ground truth makes
the target rate exact). Each generation is one line of `generations.jsonl`, keyed by
(feature, strength, prompt, image) and appended batch by batch (flushed and fsynced), so a
killed sweep re-run with the same spec redoes nothing and loses at most the batch in
progress; a truncated last line is dropped. Summaries are recomputed from the records.

Metrics per (feature, strength):
- target rate: outputs equal to the feature's concept, over the inputs whose true answer
  (ground truth on the world, else the unsteered output) is another one;
- KL(unsteered || steered) of the first generated token's distribution;
- changed: outputs that differ from the unsteered one;
- coherence: outputs inside the task's answer set (world vocabulary for that question type,
  or the spec's `answer_set`), and perplexity of the output under the unsteered model.
The best strength of a feature is the one with the highest target rate among those whose
coherence is at least `coherence_floor` (ties: the smaller strength).

The sweep runs on a run directory's SAE (RUN/sae/, with RUN/features.h5 for unit max and
RUN/recovery.json for features named by concept) and writes RUN/steering/NAME/. A spec (every key
but features optional):

    features: [142, {concept: "color:green"}, {feature: 155, concept: "shape:circle", strengths: [1, 2]}]
    strengths: [0.5, 1, 2, 4]
    mode: clamp                              # clamp | add | ablate
    unit: max                                # absolute | max
    positions: image                         # image | object | text | generated | all
    world: {task: color, n: 100, split: test, seed: 0}   # or prompts: [...] with images: [...]
                                             # with scenes_of: color, the task's questions on the
                                             # images of the colour task's n questions
    max_new_tokens: 8
    coherence_floor: 0.9
    perplexity: true                         # false: skip scoring outputs under the unsteered model
    keep_error: true                         # false: edited rows become the SAE's reconstruction
    splice: false                            # true: the model runs on the SAE's reconstruction (needs keep_error false)
    figure: true                             # false: no sweep.html/.png (a few MB and ~1 s each)

A concept is named as the recovery report names it (`color:green`), or by its value alone where
one concept has it (`green`); the target answer of a `kind:value` concept is its value. Positions
"object" are the image patches of the object each question names (the circle of "what color is
the circle ?"), from the world's ground truth.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from interp.infra.durable import write_json
from interp.infra.layout import RunLayout, SweepDir
from steering.interventions import MODES, POSITIONS, UNITS, Intervention, InterventionError, check_strength
from steering.steer import ENGINES, Query, SteerSetup

FREE_TEXT_TASKS = ("caption", "region", "at")  # answers composed of the world's words: coherent if all are words
METRICS = ("target_rate", "kl", "changed", "coherence", "perplexity")
# what must match for records of an earlier run to count as this sweep's generations
IDENTITY = ("sae_sha256", "model", "hook", "mode", "unit", "positions", "max_new_tokens", "keep_error", "splice")


class SpecError(ValueError):
    """A sweep spec that cannot be run; the message names the key and the valid ones."""


def _check_keys(d: Any, cls: type, where: str) -> dict:
    if not isinstance(d, dict):
        raise SpecError(f"{where} must be a mapping of keys to values, got {type(d).__name__}")
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise SpecError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {where}; "
                        f"valid keys: {', '.join(valid)}")
    return d


@dataclass(frozen=True)
class WorldItems:
    """Held-out shapes-world questions of one task (interp.shapes.organisms.eval.world_items); with
    `scenes_of`, the task's questions on the images of `scenes_of`'s n questions (those that can pose it),
    e.g. the size of the objects whose colour a colour sweep steers."""

    task: str = "color"
    n: int = 100
    split: str = "test"
    seed: int = 0
    scenes_of: str | None = None

    def __post_init__(self) -> None:
        from interp.shapes.world import SPLITS, TASKS

        if self.task not in TASKS:
            raise SpecError(f"unknown world task {self.task!r}; use one of {', '.join(TASKS)}")
        if self.scenes_of is not None and self.scenes_of not in TASKS:
            raise SpecError(f"unknown world scenes_of {self.scenes_of!r}; use one of {', '.join(TASKS)}")
        if self.split not in SPLITS:
            raise SpecError(f"unknown world split {self.split!r}; use one of {', '.join(SPLITS)}")
        if int(self.n) != self.n or self.n < 1:
            raise SpecError(f"world n must be a positive integer, got {self.n!r}")


@dataclass(frozen=True)
class FeatureEntry:
    """One feature to steer: by index, by concept (its recovered feature), or both; own strengths optional."""

    feature: int | None = None
    concept: str | None = None
    strengths: tuple[float, ...] | None = None


@dataclass
class SweepSpec:
    features: list[FeatureEntry]
    strengths: list[float] = field(default_factory=lambda: [1.0])
    mode: str = "clamp"
    unit: str = "max"
    positions: str = "image"
    model: str | None = None  # default: the SAE's model
    layer: str | None = None  # default: the SAE's layer
    prompts: list[str] | None = None
    images: list[str] | None = None
    world: WorldItems | None = None
    max_new_tokens: int = 8
    batch_size: int = 32
    engine: str = "nnsight"
    keep_error: bool = True
    coherence_floor: float = 0.9
    answer_set: list[str] | None = None
    perplexity: bool = True  # score every output under the unsteered model (one more forward per batch)
    splice: bool = False  # the model runs on the SAE's reconstruction at the layer (FeatureEdit); error term dropped
    figure: bool = True  # write sweep.html / .png

    @classmethod
    def from_dict(cls, raw: dict) -> SweepSpec:
        d = dict(_check_keys(raw, cls, "the sweep spec"))
        if "features" not in d:
            raise SpecError("the sweep spec needs 'features'")
        entries = d["features"] if isinstance(d["features"], list) else [d["features"]]
        d["features"] = [_entry(e, i) for i, e in enumerate(entries)]
        if not d["features"]:
            raise SpecError("the sweep spec's features list is empty")
        if "world" in d and d["world"] is not None:
            d["world"] = WorldItems(**_check_keys(d["world"], WorldItems, "the spec's world"))
        for key in ("prompts", "images", "answer_set"):
            if key in d and d[key] is not None:
                d[key] = [d[key]] if isinstance(d[key], str) else [str(v) for v in d[key]]
        if "strengths" in d:
            d["strengths"] = _strengths(d["strengths"], "strengths")
        spec = cls(**d)
        spec.validate()
        return spec

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no sweep spec at {path}")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as e:  # both parsers' errors mean the same thing: the file is malformed
            raise SpecError(f"cannot read the sweep spec {path}: {type(e).__name__}: {e}") from None
        return cls.from_dict(raw if raw is not None else {})

    def validate(self) -> None:
        for name, allowed in (("mode", MODES), ("unit", UNITS), ("positions", POSITIONS), ("engine", ENGINES)):
            if getattr(self, name) not in allowed:
                raise SpecError(f"unknown {name} {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        has_world, has_product = self.world is not None, bool(self.prompts or self.images)
        if has_world == has_product:
            raise SpecError("give the sweep's inputs either as `world` (shapes-world questions) or as `prompts` "
                            "(and `images` for multimodal models), not both or neither")
        if self.images is not None and not self.prompts:
            raise SpecError("`images` need `prompts` to ask about them")
        if self.positions == "object" and not (has_world or self.images):
            raise SpecError("positions 'object' are the image patches of the object a question names: they need "
                            "`world` questions or shapes-world `images`")
        for key in ("max_new_tokens", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise SpecError(f"{key} must be a positive integer, got {v!r}")
        if not 0 <= float(self.coherence_floor) <= 1:
            raise SpecError(f"coherence_floor must be in [0, 1], got {self.coherence_floor!r}")
        if self.splice and self.keep_error:
            raise SpecError("splice runs the model on the SAE's reconstruction, which drops the error term: "
                            "set keep_error false with it")

    def to_json(self) -> dict:
        return asdict(self)


def _entry(e: Any, i: int) -> FeatureEntry:
    if isinstance(e, bool):
        raise SpecError(f"features[{i}]: {e!r} is not a feature")
    if isinstance(e, int):
        return FeatureEntry(feature=e)
    d = _check_keys(e, FeatureEntry, f"features[{i}]")
    if d.get("feature") is None and d.get("concept") is None:
        raise SpecError(f"features[{i}] needs a feature index or a concept")
    if d.get("strengths") is not None:
        d = {**d, "strengths": tuple(_strengths(d["strengths"], f"features[{i}].strengths"))}
    return FeatureEntry(**d)


def _strengths(values: Any, where: str) -> list[float]:
    values = values if isinstance(values, list) else [values]
    if not values:
        raise SpecError(f"{where} is empty")
    try:
        return [check_strength(v, f"{where} value") for v in values]
    except InterventionError as e:
        raise SpecError(str(e)) from None


# ---------------------------------------------------------------- inputs and conditions


@dataclass
class Item:
    query: Query
    truth: str | None = None  # ground-truth answer (world questions)

    @property
    def key(self) -> tuple[str, str]:
        return self.query.prompt, self.query.image_ref


@dataclass(frozen=True)
class Condition:
    feature: int
    concept: str | None
    strength: float
    intervention: Intervention  # as the user gave it (unit may be "max")


def items_for(spec: SweepSpec) -> list[Item]:
    from interp.cache.data import load_image

    if spec.world is not None:
        from interp.shapes.organisms.eval import world_items

        from steering.steer import question_region

        w = spec.world
        out = []
        for scene, qa in world_pairs(w) if w.scenes_of else world_items(w.task, w.n, w.split, w.seed):
            ref = f"shapes:{w.split}:{scene.index}:{w.seed}"
            if qa.highlight is not None:  # the reference alone would render the image without its highlight
                ref += "#highlight=" + ",".join(map(str, qa.highlight.astype(int).ravel()))
            out.append(Item(Query(qa.question, scene.render(highlight=qa.highlight), ref,
                                  question_region(ref, qa.question, scene)), qa.answer))
        return out
    from steering.steer import image_ref, question_region

    refs = [image_ref(i) for i in spec.images] if spec.images else [None]
    images = {r: load_image(r) for r in refs if r is not None}
    return [Item(Query(p, images.get(r), r or "", question_region(r, p) if r else None))
            for p in spec.prompts for r in refs]


def world_pairs(w: WorldItems) -> list:
    """(scene, QA) of `w.task` on the scenes of `w.scenes_of`'s n questions that can pose it (fewer than n
    where some cannot), its own random stream per task (the questions are the same on every call)."""
    from interp.shapes.organisms.eval import world_items
    from interp.shapes.world import scene_questions

    rng = np.random.default_rng([w.seed, 3, sum(map(ord, w.task))])
    out = []
    for scene, _ in world_items(w.scenes_of, w.n, w.split, w.seed):
        qas = scene_questions(scene, rng, (w.task,))
        if qas:
            out.append((scene, qas[0]))
    return out


def answer_word(concept: str | None) -> str | None:
    """The answer a feature of `concept` should steer towards: the value of a `kind:value` concept of the
    world ("color:red" -> "red", "shape:letter e" -> "letter e"), else the concept itself ("red")."""
    if concept is None:
        return None
    return concept.split(":", 1)[1] if ":" in concept else concept


def concept_match(report, concept: str, where: str):
    """The report's match for `concept`: its full name (`color:red`) or, when one concept has it as its value,
    the value alone (`red`); a SpecError listing the known concepts otherwise."""
    names = [m.concept for m in report.concepts]
    if concept not in names:
        by_value = [n for n in names if answer_word(n) == concept]
        if len(by_value) != 1:
            raise SpecError(f"{where} names concept {concept!r}, which the run's recovery report does not have"
                            + (f" (it is the value of {', '.join(by_value)}: name one)" if by_value else "")
                            + f"; known concepts: {', '.join(names)}")
        concept = by_value[0]
    return report.match(concept)


def conditions_for(spec: SweepSpec, setup: SteerSetup) -> list[Condition]:
    from saes.recovery import recovery_of
    from steering.interventions import check_feature

    report = None
    out = []
    for e in spec.features:
        if e.feature is None or e.concept is None:
            try:
                report = report if report is not None else recovery_of(setup.run, setup.sae)
            except (FileNotFoundError, ValueError) as err:
                if e.feature is None:
                    raise SpecError(f"features[{spec.features.index(e)}] names concept {e.concept!r}, but the run has "
                                    f"no ground-truth recovery ({err}); give the feature's index") from None
        feature = (e.feature if e.feature is not None
                   else concept_match(report, e.concept, f"features[{spec.features.index(e)}]").feature)
        check_feature(feature, setup.sae.cfg.d_sae)
        concept = e.concept if e.concept is not None else (report.concept_of(feature) if report else None)
        strengths = [0.0] if spec.mode == "ablate" else list(e.strengths or spec.strengths)
        for s in strengths:
            out.append(Condition(feature, concept, s, Intervention(feature, spec.mode, s, spec.unit, spec.positions)))
    return out


def answer_set(spec: SweepSpec) -> set[str] | None:
    """The outputs that count as coherent: the spec's list, or the world's answers for the task."""
    if spec.answer_set is not None:
        return set(spec.answer_set)
    if spec.world is None:
        return None
    from interp.shapes.world import FILLS, LETTERS, NUMBER_WORDS, POSITIONS, SIZES, WorldConfig

    w = WorldConfig()
    return {"color": set(w.colors), "shape": set(w.shapes), "size": set(SIZES), "fill": set(FILLS),
            "where": set(POSITIONS.values()), "count": set(NUMBER_WORDS[w.min_objects: w.max_objects + 1]),
            "exists": {"yes", "no"}, "relation": {"yes", "no"}, "judge": {"yes", "no"},
            "letter": set(LETTERS)}.get(spec.world.task)


def coherent(output: str, answers: set[str] | None, task: str | None) -> bool | None:
    if answers is not None:
        return output in answers
    if task in FREE_TEXT_TASKS:  # free text: every word must be a word of the world
        from interp.shapes.world import vocabulary

        words = set(vocabulary())
        return bool(output) and all(w in words for w in output.split())
    return None


# ---------------------------------------------------------------- records


def record_key(feature: int | None, strength: float | None, prompt: str, image: str) -> str:
    return json.dumps([feature, strength, prompt, image])


class Generations:
    """The sweep's generations (RUN/steering/NAME/generations.jsonl), a record log keyed by `key`."""

    def __init__(self, path: Path):
        from interp.infra.records import RecordError, RecordLog

        try:
            self.log = RecordLog(path)
        except RecordError as e:
            raise SpecError(str(e)) from None
        self.records: dict[str, dict] = {r["key"]: r for r in self.log}

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def append(self, records: list[dict]) -> None:
        self.log.append(records)
        for r in records:
            self.records[r["key"]] = r


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # one per (feature, strength): the metrics
    best: list[dict]  # one per feature
    n_generated: int  # generations run by this call (0 when everything was already recorded)


def sweep_identity(spec: SweepSpec, setup: SteerSetup) -> dict:
    from saes.sae import sae_fingerprint

    return {"sae_sha256": sae_fingerprint(setup.run.sae), "model": setup.lm.name, "hook": setup.hook.module_path,
            "mode": spec.mode, "unit": spec.unit, "positions": spec.positions,
            "max_new_tokens": spec.max_new_tokens, "keep_error": spec.keep_error,
            **({"splice": True} if spec.splice else {})}  # absent when off: earlier sweeps' identities still match


def run_sweep(spec: SweepSpec, run: str | Path | RunLayout, name: str, setup: SteerSetup | None = None,
              progress: bool = True) -> SweepResult:
    """Run (or finish) the sweep on the run's SAE into RUN/steering/NAME/; returns the per-(feature,
    strength) metrics and best strengths. `setup`: the run's model and SAE when already loaded."""
    from tqdm import tqdm

    from interp.infra.identity import ensure_identity
    from interp.infra.runinfo import write_run_info
    from steering.steer import load_setup

    layout = RunLayout.of(run)
    sweep = layout.sweep(name)
    setup = setup or load_setup(layout, spec.model, spec.layer)
    if spec.unit == "max" and spec.mode != "ablate" and setup.max_acts is None:
        raise SpecError(f"unit 'max' needs the SAE's feature statistics ({layout.features}: `interp features "
                        f"{layout.root}`), or use unit 'absolute'")
    items, conditions = items_for(spec), conditions_for(spec, setup)  # bad input stops here, before any file
    if spec.positions == "object":
        unnamed = [it.query.prompt for it in items if it.query.region is None]
        if unnamed:
            raise SpecError(f"positions 'object' need a question naming one object of a shapes-world image; "
                            f"{len(unnamed)} of the {len(items)} inputs name none (e.g. {unnamed[0]!r} on "
                            f"{next(it.query.image_ref for it in items if it.query.region is None) or 'no image'})")
    resolved = {c: setup.resolve([c.intervention])[0] for c in conditions}
    identity = sweep_identity(spec, setup)
    sweep.root.mkdir(parents=True, exist_ok=True)
    ensure_identity(sweep.identity, identity, f"the sweep in {sweep.root}",
                    "its generations would not be comparable; use another sweep name")
    write_json(sweep.spec, spec.to_json(), indent=1, default=str)
    records = Generations(sweep.generations)
    answers, task = answer_set(spec), spec.world.task if spec.world else None
    keys = [record_key(None, None, *it.key) for it in items] + [
        record_key(c.feature, c.strength, *it.key) for c in conditions for it in items]
    done = sum(k in records for k in keys)
    bar = tqdm(total=len(keys), initial=done, desc=f"sweep {name}", disable=not progress, mininterval=1)
    generated = 0
    for batch in _chunks(items, spec.batch_size):
        generated += _run_batch(spec, setup, batch, conditions, resolved, records, answers, task, bar)
    bar.close()
    rows = summarize(records.records.values(), conditions, items)
    best = best_strengths(rows, spec.coherence_floor)
    _write_outputs(sweep, spec, rows, best)
    write_run_info(sweep.run_info, {"command": "sweep", "identity": identity, "n_items": len(items),
                                    "n_conditions": len(conditions)})
    return SweepResult(sweep.root, rows, best, generated)


def _chunks(seq: list, n: int) -> Iterator[list]:
    for s in range(0, len(seq), n):
        yield seq[s: s + n]


def _run_batch(spec, setup, batch: list[Item], conditions, resolved, records: Generations, answers, task, bar) -> int:
    from steering.steer import continuation_nll, generate, kl_divergence, next_token_logits, prepare

    base_keys = [record_key(None, None, *it.key) for it in batch]
    todo = {c: [i for i, it in enumerate(batch) if record_key(c.feature, c.strength, *it.key) not in records]
            for c in conditions}
    todo = {c: idx for c, idx in todo.items() if idx}
    missing_base = [i for i, k in enumerate(base_keys) if k not in records]
    if not todo and not missing_base:
        return 0
    kw = dict(max_new_tokens=spec.max_new_tokens, engine=spec.engine, keep_error=spec.keep_error, splice=spec.splice)
    generated = 0
    if missing_base:
        sub = prepare(setup.lm, [batch[i].query for i in missing_base])
        gen = generate(setup, sub, **kw)
        nll = continuation_nll(setup, sub, gen) if spec.perplexity else [None] * len(missing_base)
        records.append([{"kind": "baseline", "key": base_keys[i], "prompt": batch[i].query.prompt,
                         "image": batch[i].query.image_ref, "truth": batch[i].truth, "output": gen.texts[j],
                         "tokens": gen.tokens[j], "nll": _num(nll[j]),
                         "coherent": coherent(gen.texts[j], answers, task)} for j, i in enumerate(missing_base)])
        generated += len(missing_base)
        bar.update(len(missing_base))
    if not todo:
        return generated
    full = prepare(setup.lm, [it.query for it in batch])
    base_logits = next_token_logits(setup, full)
    for c, idx in todo.items():
        sub = full if len(idx) == len(batch) else prepare(setup.lm, [batch[i].query for i in idx])
        gen = generate(setup, sub, [resolved[c]], **kw)
        kl = kl_divergence(base_logits[idx], gen.first_logits).tolist()
        nll = continuation_nll(setup, sub, gen) if spec.perplexity else [None] * len(idx)
        target = answer_word(c.concept)
        new = []
        for j, i in enumerate(idx):
            it = batch[i]
            base = records.records[base_keys[i]]["output"]
            truth = it.truth if it.truth is not None else base
            out = gen.texts[j]
            new.append({"kind": "steered", "key": record_key(c.feature, c.strength, *it.key), "feature": c.feature,
                        "concept": c.concept, "strength": c.strength, "value": resolved[c].value, "mode": spec.mode,
                        "unit": spec.unit, "positions": spec.positions, "prompt": it.query.prompt,
                        "image": it.query.image_ref, "truth": it.truth, "baseline": base, "output": out,
                        "tokens": gen.tokens[j], "changed": out != base,
                        "target": None if target is None or truth == target else out == target,
                        "coherent": coherent(out, answers, task), "kl": _num(kl[j]), "nll": _num(nll[j])})
        records.append(new)
        generated += len(idx)
        bar.update(len(idx))
    return generated


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(records, conditions: list[Condition], items: list[Item]) -> list[dict]:
    """Metrics per (feature, strength) over this spec's inputs (records of other inputs are ignored)."""
    by_key = {r["key"]: r for r in records}
    rows = []
    for c in conditions:
        recs = [by_key[k] for k in (record_key(c.feature, c.strength, *it.key) for it in items) if k in by_key]
        hits = [r["target"] for r in recs if r["target"] is not None]
        nll = _mean([r["nll"] for r in recs])
        rows.append({"feature": c.feature, "concept": c.concept, "strength": c.strength,
                     "value": recs[0]["value"] if recs else None, "n": len(recs), "n_target": len(hits),
                     "hits": int(sum(hits)), "n_coherent": sum(bool(r["coherent"]) for r in recs),
                     "target_rate": _mean(hits), "kl": _mean([r["kl"] for r in recs]),
                     "changed": _mean([r["changed"] for r in recs]),
                     "coherence": _mean([r["coherent"] for r in recs]),
                     "perplexity": math.exp(nll) if nll is not None else None})
    return rows


def best_strengths(rows: list[dict], floor: float) -> list[dict]:
    """Per feature: the strength with the highest target rate among those coherent enough."""
    out = []
    for feature in dict.fromkeys(r["feature"] for r in rows):
        mine = [r for r in rows if r["feature"] == feature]
        ok = [r for r in mine if r["target_rate"] is not None and (r["coherence"] is None or r["coherence"] >= floor)]
        best = max(ok, key=lambda r: (r["target_rate"], -abs(r["strength"])), default=None)
        note = {"note": "no strength moved any answer to the target"} if best and best["target_rate"] == 0 else {}
        out.append({"feature": feature, "concept": mine[0]["concept"], "coherence_floor": floor, **note,
                    **({k: best[k] for k in ("strength", "value", "target_rate", "coherence", "kl", "changed",
                                              "perplexity", "n_target", "hits")} if best else
                       {"strength": None, "reason": "no target concept" if mine[0]["concept"] is None
                        else f"no strength keeps coherence >= {floor}"})})
    return out


def _write_outputs(sweep: SweepDir, spec: SweepSpec, rows: list[dict], best: list[dict]) -> None:
    with open(sweep.summary_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_json(sweep.summary, {"rows": rows, "best": best, "spec": spec.to_json()}, indent=1, default=str)
    if spec.figure:
        plot(rows, best, sweep)


def plot(rows: list[dict], best: list[dict], sweep: SweepDir) -> None:
    """Each metric against strength, one line per feature (the best strength marked): HTML and JSON."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    titles = {"target_rate": "target rate", "kl": "KL(base || steered), nats", "changed": "outputs changed",
              "coherence": "coherence (in answer set)", "perplexity": "perplexity under the unsteered model"}
    fig = make_subplots(rows=len(METRICS), cols=1, shared_xaxes=True, subplot_titles=[titles[m] for m in METRICS],
                        vertical_spacing=0.05)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for j, feature in enumerate(dict.fromkeys(r["feature"] for r in rows)):
        mine = sorted((r for r in rows if r["feature"] == feature), key=lambda r: r["strength"])
        name = f"{feature}" + (f" {mine[0]['concept']}" if mine[0]["concept"] else "")
        color = palette[j % len(palette)]
        pick = next((b["strength"] for b in best if b["feature"] == feature), None)
        for i, m in enumerate(METRICS):
            fig.add_trace(go.Scatter(x=[r["strength"] for r in mine], y=[r[m] for r in mine], mode="lines+markers",
                                     name=name, legendgroup=name, showlegend=i == 0, line=dict(color=color)),
                          row=i + 1, col=1)
            hit = [r for r in mine if r["strength"] == pick]
            if hit and hit[0][m] is not None:
                fig.add_trace(go.Scatter(x=[pick], y=[hit[0][m]], mode="markers", legendgroup=name, showlegend=False,
                                         marker=dict(symbol="star", size=13, color=color), hoverinfo="skip"),
                              row=i + 1, col=1)
    fig.update_xaxes(title_text="strength (★ = chosen)", row=len(METRICS), col=1)
    fig.update_layout(height=260 * len(METRICS), template="plotly_white", title="Steering sweep")
    from interp.infra.durable import write_text
    from interp.infra.plots import write_figure

    write_figure(fig, sweep.figure("html"))  # plotly.js inside (offline) and sweep.png
    write_text(sweep.figure("json"), fig.to_json())

