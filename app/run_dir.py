"""Where each stage's output lives in a run directory, and the command that makes what is missing.

The app reads only the run directory it was given. Stages write to conventional places
(`interp demo` lays them out as below), but the SAE, the cache and the evaluation can also be
where their commands put them by default, so each is looked for in a few places, and a path
recorded inside a run file (features.h5 names its cache and SAE) is resolved inside the run
directory: as given if it lies inside, else relative to it, else by its longest tail that
exists inside it (a run directory that was moved or copied keeps working).

    RUN/activations.h5            interp cache        RUN/features.h5      interp features
    RUN/sae/sae/                  interp train        RUN/recovery.json    interp recovery
    RUN/sae/metrics.jsonl         interp train        RUN/explanations.jsonl  interp explain
    RUN/eval/eval.json            interp eval         RUN/scores.jsonl     interp score
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py

STAGES = ("cache", "sae", "metrics", "eval", "features", "recovery", "explanations", "scores")


@dataclass(frozen=True)
class StageStatus:
    stage: str
    path: Path | None  # None: missing
    command: str  # what makes it
    note: str = ""  # why a recorded path was not used, if so


def _h5_format(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            v = f.attrs.get("format")
    except OSError:
        return None
    return v.decode() if isinstance(v, bytes) else v


def _is_cache(p: Path) -> bool:
    from interp.cache.format import FORMAT

    return p.is_file() and _h5_format(p) == FORMAT


def _is_features(p: Path) -> bool:
    from explain.feature_reader import FORMAT

    return p.is_file() and _h5_format(p) == FORMAT


def _is_sae(p: Path) -> bool:
    from saes.sae import CFG_FILENAME, WEIGHTS_FILENAME

    return p.is_dir() and (p / CFG_FILENAME).is_file() and (p / WEIGHTS_FILENAME).is_file()


def read_json(path: Path | None) -> dict:
    """A JSON file's object, or {} when it is absent or unreadable."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class RunDir:
    """One run directory: finds each stage's files, and names the command for each missing one."""

    def __init__(self, root: str | Path):
        self.given = str(root)
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"RunDir({self.given!r})"

    @property
    def exists(self) -> bool:
        return self.root.is_dir()

    # ---------------------------------------------------------------- resolving paths

    def inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root)
        except ValueError:
            return False
        return True

    def resolve(self, recorded: str | Path | None, valid: Callable[[Path], bool] = Path.exists) -> Path | None:
        """A path recorded in a run file, found inside the run directory (None if it is not there)."""
        if not recorded:
            return None
        p = Path(recorded).expanduser()
        candidates = [p] if p.is_absolute() else [self.root / p]
        parts = p.parts[1:] if p.is_absolute() else p.parts
        candidates += [self.root.joinpath(*parts[-n:]) for n in range(len(parts), 0, -1)]
        for c in candidates:
            if self.inside(c) and valid(c):
                return c.resolve()
        return None

    def _first(self, candidates: list[Path], valid: Callable[[Path], bool]) -> Path | None:
        return next((c for c in candidates if self.inside(c) and valid(c)), None)

    # ---------------------------------------------------------------- stage files

    @cached_property
    def features(self) -> Path | None:
        return self._first([self.root / "features.h5", self.root / "sae" / "sae" / "features.h5",
                            self.root / "sae" / "features.h5"], _is_features)

    @cached_property
    def features_meta(self) -> dict[str, Any]:
        if self.features is None:
            return {}
        from explain.feature_reader import FeatureStats

        with FeatureStats(self.features) as fs:
            return dict(fs.meta)

    @cached_property
    def cache(self) -> Path | None:
        found = self._first([self.root / "activations.h5"], _is_cache)
        found = found or self.resolve(self.features_meta.get("cache_path"), _is_cache)
        if found is None and self.exists:
            found = self._first(sorted(self.root.glob("*.h5")), _is_cache)
        return found

    @cached_property
    def sae(self) -> Path | None:
        found = self._first([self.root / "sae" / "sae", self.root / "sae"], _is_sae)
        found = found or self.resolve(self.features_meta.get("sae_path"), _is_sae)
        if found is None and self.exists:
            found = self._first(sorted(self.root.glob("*/sae")) + sorted(self.root.glob("*/")), _is_sae)
        return found

    @cached_property
    def metrics(self) -> Path | None:
        dirs = ([self.sae.parent, self.sae] if self.sae else []) + [self.root / "sae", self.root]
        return self._first([d / "metrics.jsonl" for d in dirs], Path.is_file)

    @cached_property
    def eval(self) -> Path | None:
        dirs = [self.root / "eval"] + ([self.sae, self.sae.parent] if self.sae else []) + [self.root]
        return self._first([d / "eval.json" for d in dirs], Path.is_file)

    @cached_property
    def density_figure(self) -> Path | None:
        """The plotly figure `interp eval` writes next to eval.json."""
        return self._first([self.eval.parent / "density.json"], Path.is_file) if self.eval else None

    @cached_property
    def recovery(self) -> Path | None:
        dirs = [self.root] + ([self.sae, self.sae.parent] if self.sae else []) + [self.root / "eval"]
        return self._first([d / "recovery.json" for d in dirs], Path.is_file)

    @cached_property
    def explanations(self) -> Path | None:
        return self._first([self.root / "explanations.jsonl"], Path.is_file)

    @cached_property
    def scores(self) -> Path | None:
        return self._first([self.root / "scores.jsonl"], Path.is_file)

    @cached_property
    def score_summary(self) -> Path | None:
        return self._first([self.root / "score_summary.json"], Path.is_file)

    @cached_property
    def run_info(self) -> dict[str, Any]:
        return read_json(self.root / "run.json")

    # ---------------------------------------------------------------- what the run is about

    @cached_property
    def sae_cfg(self) -> dict[str, Any]:
        """The SAE's cfg.json (SAELens layout; ours under metadata.lmmscope.config)."""
        from saes.sae import CFG_FILENAME

        return read_json(self.sae / CFG_FILENAME) if self.sae else {}

    @cached_property
    def cache_meta(self) -> dict[str, Any]:
        if self.cache is None:
            return {}
        from interp.cache.reader import ActivationReader

        with ActivationReader(self.cache) as r:
            return dict(r.meta)

    @property
    def model_name(self) -> str | None:
        """The model the activations come from (the SAE's record, else the cache's)."""
        meta = self.sae_cfg.get("metadata") or {}
        return meta.get("model_name") or self.sae_cfg.get("model_name") or self.cache_meta.get("model") or None

    @property
    def layer(self) -> str | None:
        return self.cache_meta.get("layer") or (self.sae_cfg.get("metadata") or {}).get("hook_name")

    @property
    def is_shapes(self) -> bool:
        data = self.cache_meta.get("data")
        return isinstance(data, dict) and data.get("kind") == "shapes"

    # ---------------------------------------------------------------- missing stages

    def subruns(self) -> list[Path]:
        """Run directories nested in this one (e.g. the demo's steering-layer0/): each opens on its own."""
        if not self.exists:
            return []
        return [d for d in sorted(self.root.iterdir()) if d.is_dir() and d.name not in ("sae", "eval")
                and (_is_features(d / "features.h5") or _is_sae(d / "sae" / "sae"))]

    def path(self, stage: str) -> Path | None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return getattr(self, stage)

    def _shown(self, path: Path | None, default: str) -> str:
        """A path as the user would type it: under the run directory as they gave it."""
        if path is None:
            return f"{self.given.rstrip('/')}/{default}"
        return f"{self.given.rstrip('/')}/{path.relative_to(self.root)}" if self.inside(path) else str(path)

    def command(self, stage: str) -> str:
        """The command that makes `stage`'s output in this run directory."""
        run = self.given.rstrip("/")
        cache, sae = self._shown(self.cache, "activations.h5"), self._shown(self.sae, "sae/sae")
        sae_out = self._shown(self.sae.parent, "sae") if self.sae else f"{run}/sae"
        model = self.model_name or "MODEL"
        commands = {
            "cache": f"interp cache --model {model} --layer LAYER --data shapes --out {run}/activations.h5",
            "sae": f"interp train --cache {cache} --out {sae_out}",
            "metrics": f"interp train --cache {cache} --out {sae_out}",
            "eval": f"interp eval --sae {sae} --cache {cache} --out {run}/eval",
            "features": f"interp features --cache {cache} --sae {sae} --out {run}/features.h5",
            "recovery": f"interp recovery --sae {sae} --cache {cache} --out {run}/recovery.json",
            "explanations": f"interp explain {run}",
            "scores": f"interp score {run}",
        }
        return commands[stage]

    def note(self, stage: str) -> str:
        """Why a path that a run file records was not used (it lies outside the run directory)."""
        if stage in ("cache", "sae") and self.path(stage) is None:
            recorded = self.features_meta.get(f"{stage}_path")
            if recorded:
                return (f"features.h5 records the {'activation cache' if stage == 'cache' else 'SAE'} at {recorded}, "
                        f"which is not inside {self.given}; copy or link it into the run directory")
        return ""

    def status(self) -> list[StageStatus]:
        return [StageStatus(s, self.path(s), self.command(s), self.note(s)) for s in STAGES]

    def missing(self) -> list[StageStatus]:
        return [s for s in self.status() if s.path is None]

    def message(self, stage: str) -> str:
        """One line for a page that needs `stage`: what is missing and the command that makes it."""
        if not self.exists:
            return f"{self.given} is not a directory: give `interp app` a run directory (e.g. one made by " \
                   f"`interp demo --out {self.given}`)"
        what = {"cache": "activation cache (activations.h5)", "sae": "SAE (sae/sae)",
                        "metrics": "SAE training metrics (metrics.jsonl)", "eval": "SAE evaluation (eval.json)",
                        "features": "feature statistics (features.h5)",
                        "recovery": "ground-truth recovery report (recovery.json)",
                        "explanations": "explanations (explanations.jsonl)",
                        "scores": "explanation scores (scores.jsonl)"}[stage]
        note = self.note(stage)
        return f"No {what} in this run yet. Make it with `{self.command(stage)}`" + (f" ({note})." if note else ".")
