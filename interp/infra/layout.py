"""The run directory: the one module that names every file in it.

Every stage writes its output where `RunLayout` says and every reader (explain, score, steer, the
app, the notebooks) opens its inputs there, so a run directory made by the stages one by one, by
`interp demo`, or assembled by hand is read the same way. Nothing resolves paths: a cache or an SAE
that is symlinked or copied into place is used as it is found (an SAE trained elsewhere, a cache
shared by several runs). The spec, with the formats of the files, is docs/formats.md.

    RUN/activations.h5          the activation cache (interp cache)
    RUN/activations.h5.parts/   the cache while it is written (part files, manifest.json)
    RUN/activations.safetensors a [rows, d] tensor to train on instead of a cache (optional)
    RUN/sae/                    the final SAE, SAELens format (interp train)
    RUN/train/checkpoint/       the training checkpoint; RUN/train/metrics.jsonl its metrics, curves.html/.png
    RUN/eval/eval.json          SAE evaluation, with density.html / .png / .json (interp eval)
    RUN/features.h5             feature statistics and example samples (interp features)
    RUN/recovery.json           ground-truth recovery, shapes world (interp recovery), recovery.html/.png
    RUN/notebooks/NAME.ipynb    executed copies of the notebooks, with outputs (interp notebooks)
    RUN/crossmodal.json         per concept, the best feature on its patches and on its word (interp crossmodal)
    RUN/explanations.jsonl      explanations; RUN/explainer_cache.jsonl the explainer's replies (interp explain)
    RUN/scores.jsonl            scores; RUN/score_summary.json their summary (interp score)
    RUN/text_explanations.jsonl, text_scores.jsonl, text_score_summary.json   text features (interp explain-text, score-text)
    RUN/explanation-methods/METHOD/  explanations, scores, score summary of one explanation method
                                (explain.methods: ours, reference, contrastive, side by side)
    RUN/steering/NAME/          one steering sweep (interp sweep; `interp steer-targets` writes select/, test/)
    RUN/steering_summary.json   steering and attribution on the shapes world (interp steer-targets)
    RUN/steering-layerL/        a nested run for steering with an SAE at another layer L (the pipeline makes none)
    RUN/crossmodal-layerL/      a nested run with every token role at layer L; RUN/crossmodal_sweep.json (+ .html/.png)
                                the layer sweep (interp crossmodal-sweep, the demo, the benchmark)
    RUN/summary.json            the demo's headline numbers; RUN/world.png its contact sheet (interp demo)
    RUN/report.md, benchmark.json, FIGURE.html/.json, ARCH/, seed-S/ARCH/   (interp benchmark; ARCH/ is a run per
                                architecture, seed-S/ those of a further SAE training seed)
    RUN/STAGE_run.json          how each stage that wrote here was run (config, versions, argv, time)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LAYOUT_VERSION = "lmmscope.run/1"
STEERING_PREFIX = "steering-layer"
CROSSMODAL_PREFIX = "crossmodal-layer"


@dataclass(frozen=True)
class SweepDir:
    """One steering sweep's directory (RUN/steering/NAME/)."""

    root: Path

    @property
    def identity(self) -> Path:
        return self.root / "identity.json"

    @property
    def generations(self) -> Path:
        return self.root / "generations.jsonl"

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def figure(self, ext: str) -> Path:
        return self.root / f"sweep.{ext}"

    @property
    def run_info(self) -> Path:
        return self.root / "sweep_run.json"


@dataclass(frozen=True)
class RunLayout:
    """Where everything of one run directory lives; `RunLayout.of(x)` takes a path or a layout."""

    root: Path

    @classmethod
    def of(cls, run: str | os.PathLike | RunLayout) -> RunLayout:
        if isinstance(run, RunLayout):
            return run
        if run is None or str(run) == "":
            raise ValueError("no run directory given: every stage reads and writes one run directory (RUN)")
        return cls(Path(run))

    def __str__(self) -> str:
        return str(self.root)

    def mkdir(self) -> RunLayout:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # ---------------------------------------------------------------- the cache stage
    @property
    def cache(self) -> Path:
        return self.root / "activations.h5"

    @property
    def cache_parts(self) -> Path:
        return self.root / "activations.h5.parts"

    @property
    def cache_tensor(self) -> Path:
        return self.root / "activations.safetensors"

    # ---------------------------------------------------------------- the saes stage
    @property
    def sae(self) -> Path:
        return self.root / "sae"

    @property
    def training(self) -> Path:
        return self.root / "train"

    @property
    def checkpoint(self) -> Path:
        return self.training / "checkpoint"

    @property
    def metrics(self) -> Path:
        return self.training / "metrics.jsonl"

    def training_figure(self, ext: str = "html") -> Path:
        """The training curves (loss, FVU, L0, dead fraction) `interp train` draws from metrics.jsonl."""
        return self.training / f"curves.{ext}"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval(self) -> Path:
        return self.eval_dir / "eval.json"

    def density_figure(self, ext: str = "json") -> Path:
        return self.eval_dir / f"density.{ext}"

    @property
    def recovery(self) -> Path:
        return self.root / "recovery.json"

    def recovery_figure(self, ext: str = "html") -> Path:
        """Best SAE feature against best raw neuron per concept (`interp recovery`)."""
        return self.root / f"recovery.{ext}"

    @property
    def crossmodal(self) -> Path:
        return self.root / "crossmodal.json"

    # ---------------------------------------------------------------- the explain stage
    @property
    def features(self) -> Path:
        return self.root / "features.h5"

    @property
    def explanations(self) -> Path:
        return self.root / "explanations.jsonl"

    @property
    def explainer_cache(self) -> Path:
        return self.root / "explainer_cache.jsonl"

    @property
    def scores(self) -> Path:
        return self.root / "scores.jsonl"

    @property
    def score_summary(self) -> Path:
        return self.root / "score_summary.json"

    @property
    def text_explanations(self) -> Path:
        return self.root / "text_explanations.jsonl"

    @property
    def text_scores(self) -> Path:
        return self.root / "text_scores.jsonl"

    @property
    def text_score_summary(self) -> Path:
        return self.root / "text_score_summary.json"

    @property
    def explanation_methods(self) -> Path:
        return self.root / "explanation-methods"

    def explanation_method(self, method: str) -> RunLayout:
        """One explanation method's records (explain.methods): RUN/explanation-methods/METHOD/ holds its
        explanations.jsonl, scores.jsonl and score_summary.json, named as a run's own."""
        if not method or "/" in method or method.startswith("."):
            raise ValueError(f"an explanation method's name is one plain directory name, got {method!r}")
        return RunLayout(self.explanation_methods / method)

    # ---------------------------------------------------------------- the steering stage
    def sweep(self, name: str) -> SweepDir:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"a sweep name is one plain directory name, got {name!r}")
        return SweepDir(self.root / "steering" / name)

    @property
    def steering_summary(self) -> Path:
        return self.root / "steering_summary.json"

    @property
    def steering_crossmodal(self) -> Path:
        return self.root / "steering_crossmodal.json"

    def steering_run(self, layer: int | str) -> RunLayout:
        """The nested run of steering at another layer (its own cache, SAE and features)."""
        return RunLayout(self.root / f"{STEERING_PREFIX}{layer}")

    # ---------------------------------------------------------------- the pipeline
    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def world_sheet(self) -> Path:
        return self.root / "world.png"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def benchmark(self) -> Path:
        return self.root / "benchmark.json"

    def figure(self, name: str, ext: str) -> Path:
        return self.root / f"{name}.{ext}"

    def notebook(self, name: str) -> Path:
        """An executed copy of notebooks/NAME.ipynb run on this run directory, with its outputs."""
        return self.root / "notebooks" / f"{name}.ipynb"

    @property
    def crossmodal_sweep(self) -> Path:
        return self.root / "crossmodal_sweep.json"

    def crossmodal_run(self, layer: int | str) -> RunLayout:
        """The nested run of the cross-modal sweep at one layer (a question-answer cache with every role)."""
        return RunLayout(self.root / f"{CROSSMODAL_PREFIX}{layer}")

    def arch_run(self, arch: str) -> RunLayout:
        """The benchmark's run of one SAE architecture."""
        return RunLayout(self.root / arch)

    def seed_run(self, seed: int) -> RunLayout:
        """The runs of one further SAE training seed (`--seeds`): the benchmark's, one per architecture inside;
        a cross-modal layer run's, with that seed's SAE on the layer's cache."""
        return RunLayout(self.root / f"seed-{seed}")

    def run_info(self, stage: str) -> Path:
        return self.root / f"{stage.replace(' ', '_')}_run.json"

    def run_infos(self) -> list[Path]:
        return sorted(self.root.glob("*_run.json")) if self.root.is_dir() else []

    def subruns(self) -> list[Path]:
        """The nested runs: steering with an SAE at another layer (RUN/steering-layerL/) and cross-modal
        caches (RUN/crossmodal-layerL/)."""
        if not self.root.is_dir():
            return []
        return sorted(p for prefix in (STEERING_PREFIX, CROSSMODAL_PREFIX) for p in self.root.glob(f"{prefix}*")
                      if p.is_dir())

    # ---------------------------------------------------------------- sharing inputs between runs
    def link(self, name: str, target: str | os.PathLike) -> Path:
        """Make RUN/<name> a relative symlink to `target` (an input shared with another run): `name` is
        one of this layout's attributes, e.g. link("cache", other.cache)."""
        path = getattr(self, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        target = Path(target)
        if path.is_symlink() or path.exists():
            if path.resolve() == target.resolve():
                return path
            raise FileExistsError(f"{path} already exists and is not {target}: use another run directory")
        path.symlink_to(os.path.relpath(target.resolve(), path.parent.resolve()))
        return path
