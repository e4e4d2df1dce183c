"""The run directory the app shows: each stage's file where the run layout puts it, or the command
that makes it.

The app reads only the run directory it was given, and only through `interp.infra.layout`: every
stage's output has one place (RUN/activations.h5, RUN/sae/, RUN/features.h5, ...), so there is
nothing to search. A cache or an SAE that lives elsewhere is used by linking or copying it into
that place; a run directory that was moved or copied keeps working.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py

from interp.infra.layout import RunLayout

STAGES = ("cache", "sae", "metrics", "eval", "features", "recovery", "explanations", "scores")
WHAT = {"cache": "activation cache (activations.h5)", "sae": "SAE (sae/)",
        "metrics": "SAE training metrics (train/metrics.jsonl)", "eval": "SAE evaluation (eval/eval.json)",
        "features": "feature statistics (features.h5)", "recovery": "ground-truth recovery report (recovery.json)",
        "explanations": "explanations (explanations.jsonl)", "scores": "explanation scores (scores.jsonl)"}


@dataclass(frozen=True)
class StageStatus:
    stage: str
    path: Path | None  # None: missing
    command: str  # what makes it


def _h5_format(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            v = f.attrs.get("format")
    except OSError:
        return None
    return v.decode() if isinstance(v, bytes) else v


def _is_cache(p: Path) -> bool:
    from interp.cache.format import READABLE_FORMATS

    return p.is_file() and _h5_format(p) in READABLE_FORMATS


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
    """One run directory: each stage's file (None while missing) and the command for each missing one."""

    def __init__(self, root: str | Path):
        self.given = str(root)
        self.layout = RunLayout(Path(root).expanduser())
        self.root = self.layout.root

    def __repr__(self) -> str:
        return f"RunDir({self.given!r})"

    @property
    def exists(self) -> bool:
        return self.root.is_dir()

    @staticmethod
    def _if(path: Path, valid) -> Path | None:
        return path if valid(path) else None

    # ---------------------------------------------------------------- stage files
    @cached_property
    def cache(self) -> Path | None:
        return self._if(self.layout.cache, _is_cache)

    @cached_property
    def sae(self) -> Path | None:
        return self._if(self.layout.sae, _is_sae)

    @cached_property
    def metrics(self) -> Path | None:
        return self._if(self.layout.metrics, Path.is_file)

    @cached_property
    def eval(self) -> Path | None:
        return self._if(self.layout.eval, Path.is_file)

    @cached_property
    def density_figure(self) -> Path | None:
        """The plotly figure `interp eval` writes next to eval.json."""
        return self._if(self.layout.density_figure("json"), Path.is_file)

    @cached_property
    def features(self) -> Path | None:
        return self._if(self.layout.features, _is_features)

    @cached_property
    def recovery(self) -> Path | None:
        return self._if(self.layout.recovery, Path.is_file)

    @cached_property
    def explanations(self) -> Path | None:
        return self._if(self.layout.explanations, Path.is_file)

    @cached_property
    def scores(self) -> Path | None:
        return self._if(self.layout.scores, Path.is_file)

    @cached_property
    def score_summary(self) -> Path | None:
        return self._if(self.layout.score_summary, Path.is_file)

    @cached_property
    def run_info(self) -> dict[str, Any]:
        """How each stage that wrote here was run: {file name: its record}."""
        return {p.name: read_json(p) for p in self.layout.run_infos()}

    # ---------------------------------------------------------------- what the run is about
    @cached_property
    def features_meta(self) -> dict[str, Any]:
        if self.features is None:
            return {}
        from explain.feature_reader import FeatureReader

        with FeatureReader(self.features) as fs:
            return dict(fs.meta)

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
        """Run directories nested in this one (the demo's and the cross-modal sweep's crossmodal-layerL/, a
        steering run at another layer): each opens on its own."""
        return [d for d in self.layout.subruns() if _is_features(RunLayout(d).features) or _is_sae(RunLayout(d).sae)]

    def path(self, stage: str) -> Path | None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return getattr(self, stage)

    def command(self, stage: str) -> str:
        """The command that makes `stage`'s output in this run directory."""
        run = self.given.rstrip("/") or "."
        model = self.model_name or "MODEL"
        commands = {
            "cache": f"interp cache {run} --model {model} --layer LAYER --data shapes",
            "sae": f"interp train {run}", "metrics": f"interp train {run}", "eval": f"interp eval {run}",
            "features": f"interp features {run}", "recovery": f"interp recovery {run}",
            "explanations": f"interp explain {run}", "scores": f"interp score {run}",
        }
        return commands[stage]

    def status(self) -> list[StageStatus]:
        return [StageStatus(s, self.path(s), self.command(s)) for s in STAGES]

    def missing(self) -> list[StageStatus]:
        return [s for s in self.status() if s.path is None]

    def message(self, stage: str) -> str:
        """One line for a page that needs `stage`: what is missing and the command that makes it."""
        if not self.exists:
            return (f"{self.given} is not a directory: give `interp app` a run directory (e.g. one made by "
                    f"`interp demo {self.given}`)")
        linkable = stage in ("cache", "sae")
        where = getattr(self.layout, stage, None) if linkable else None
        also = f", or link an existing one to {where}" if linkable else ""
        return f"No {WHAT[stage]} in this run yet. Make it with `{self.command(stage)}`{also}."
