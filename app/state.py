"""The run directory the app was started on, and everything read from it, loaded once and cached.

Heavy objects (open HDF5 files, the SAE, the model) are `st.cache_resource`, shared by all
sessions; small derived data are `st.cache_data`. Cache keys carry each file's modification
time, so a stage that writes while the app runs (e.g. "explain and score now") is picked up.
Those arguments must not start with an underscore: Streamlit leaves `_name` arguments out of the
cache key (that is how it skips unhashable ones, like an open reader), so a `_mtime` key never
changes and the page keeps showing the file as it first read it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app.run_dir import RunDir, read_json
from app.tables import build_table, read_store

ENV_RUN_DIR = "LMMSCOPE_RUN_DIR"


def run_dir_arg() -> str:
    """The run directory: $LMMSCOPE_RUN_DIR, else the first argument after `streamlit run app/main.py --`."""
    env = os.environ.get(ENV_RUN_DIR)
    if env:
        return env
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else "."


def current_run() -> RunDir:
    return _run(run_dir_arg(), _mtime_of_dir(run_dir_arg()))


def _mtime_of_dir(path: str) -> int:
    """Changes when a stage adds or removes a file in the run directory or its usual subdirectories."""
    root = Path(path)
    stamps = []
    for d in (root, root / "eval", root / "sae", root / "train"):
        try:
            stamps.append(d.stat().st_mtime_ns)
        except OSError:
            pass
    return max(stamps, default=0)


@st.cache_resource(show_spinner=False, max_entries=8)
def _run(path: str, mtime_ns: int) -> RunDir:
    return RunDir(path)


def mtime(path: Path | None) -> int:
    try:
        return path.stat().st_mtime_ns if path else 0
    except OSError:
        return 0


# ---------------------------------------------------------------- run files


@st.cache_resource(show_spinner="Opening features.h5 …", max_entries=4)
def _stats(path: str, mtime_ns: int):
    from explain.feature_reader import FeatureReader

    return FeatureReader(path)


def stats(run: RunDir):
    """The run's FeatureReader (None without features.h5)."""
    return _stats(str(run.features), mtime(run.features)) if run.features else None


@st.cache_resource(show_spinner="Opening the cache and the SAE …", max_entries=4)
def _sources(run_dir: str, mtimes: tuple[int, ...]):
    from explain.feature_reader import FeatureSources

    return FeatureSources.open(run_dir, device="cpu")


def sources(run: RunDir):
    """FeatureSources over the run's features, cache and SAE (checked to belong together);
    None when one is missing. Raises FeatureFileError when they do not belong together."""
    if not (run.features and run.cache and run.sae):
        return None
    return _sources(str(run.root), (mtime(run.features), mtime(run.cache), mtime(run.sae / "sae_weights.safetensors")))


@st.cache_resource(show_spinner="Loading the SAE …", max_entries=4)
def _sae(path: str, mtime_ns: int):
    from saes.sae import SAE

    return SAE.load(path, device="cpu").eval()


def sae(run: RunDir):
    return _sae(str(run.sae), mtime(run.sae / "sae_weights.safetensors")) if run.sae else None


@st.cache_resource(show_spinner="Opening the activation cache …", max_entries=4)
def _reader(path: str, mtime_ns: int):
    from interp.cache.reader import ActivationReader

    return ActivationReader(path)


def reader(run: RunDir):
    return _reader(str(run.cache), mtime(run.cache)) if run.cache else None


@st.cache_data(show_spinner=False, max_entries=32)
def _json(path: str, mtime_ns: int) -> dict:
    return read_json(Path(path))


def json_file(path: Path | None) -> dict:
    return _json(str(path), mtime(path)) if path else {}


@st.cache_data(show_spinner=False, max_entries=8)
def _store(path: str, mtime_ns: int) -> dict[int, dict]:
    return read_store(path)


def explanations(run: RunDir) -> dict[int, dict]:
    return _store(str(run.explanations), mtime(run.explanations)) if run.explanations else {}


def scores(run: RunDir) -> dict[int, dict]:
    return _store(str(run.scores), mtime(run.scores)) if run.scores else {}


@st.cache_data(show_spinner=False, max_entries=8)
def _metrics(path: str, mtime_ns: int) -> pd.DataFrame:
    from interp.infra.records import read_records

    return pd.DataFrame(list(read_records(path)))


def metrics(run: RunDir) -> pd.DataFrame | None:
    return _metrics(str(run.metrics), mtime(run.metrics)) if run.metrics else None


@st.cache_data(show_spinner="Building the feature table …", max_entries=8)
def _table(features: str, mtimes: tuple[int, ...], explanations_path: str | None, scores_path: str | None,
           ) -> pd.DataFrame:
    return build_table(_stats(features, mtimes[0]).summary_table(), read_store(explanations_path),
                       read_store(scores_path))


def feature_table(run: RunDir) -> pd.DataFrame | None:
    """Every feature's statistics, explanation and score (None without features.h5)."""
    if not run.features:
        return None
    keys = (mtime(run.features), mtime(run.explanations), mtime(run.scores))
    return _table(str(run.features), keys, str(run.explanations) if run.explanations else None,
                  str(run.scores) if run.scores else None)


@st.cache_resource(show_spinner=False, max_entries=8)
def _recovery(path: str, mtime_ns: int):
    from interp.shapes.concepts import load_recovery

    try:
        return load_recovery(path)
    except ValueError:  # a report of an older format: as if there were none
        return None


def recovery(run: RunDir):
    """The run's recovery report (interp.shapes.concepts.RecoveryReport), None without one."""
    return _recovery(str(run.recovery), mtime(run.recovery)) if run.recovery else None


def recovery_by_feature(run: RunDir) -> dict:
    """The recovery report's concepts, grouped by the feature that best detects each."""
    report = recovery(run)
    return report.by_feature() if report is not None else {}


# ---------------------------------------------------------------- models and derived arrays


@st.cache_resource(show_spinner="Loading the model (once) …", max_entries=2)
def model(name: str):
    from interp.model.models import load_model

    return load_model(name, device="cpu")


@st.cache_resource(show_spinner=False, max_entries=4)
def _unit_decoder(path: str, mtime_ns: int):
    from app.analysis import unit_rows

    return unit_rows(_sae(path, mtime_ns).W_dec)


def unit_decoder(run: RunDir):
    return _unit_decoder(str(run.sae), mtime(run.sae / "sae_weights.safetensors")) if run.sae else None


@st.cache_resource(show_spinner="Labelling cached tokens with the shapes world's ground truth …", max_entries=2)
def _ground_truth(path: str, mtime_ns: int):
    from interp.shapes.ground_truth import token_concepts

    try:
        return token_concepts(_reader(path, mtime_ns), with_object=False)
    except ValueError:  # not a shapes-world cache
        return None


CHEAP_ROWS = 500_000  # cached rows up to which a feature's per-concept scores are computed without asking


@st.cache_data(show_spinner="Scoring the feature against every ground-truth concept …", max_entries=256)
def _concept_scores(cache: str, sae_dir: str, mtimes: tuple[int, int], feature: int) -> pd.DataFrame | None:
    from app.analysis import feature_column
    from interp.shapes.concepts import concept_scores

    gt = _ground_truth(cache, mtimes[0])
    if gt is None:
        return None
    values = feature_column(_sae(sae_dir, mtimes[1]), _reader(cache, mtimes[0]), feature, gt.rows)
    return pd.DataFrame(concept_scores(values, gt.labels(), gt.concepts))


def concept_scores(run: RunDir, feature: int) -> pd.DataFrame | None:
    """How well one feature detects each concept of a shapes-world cache (None for other data)."""
    if not (run.cache and run.sae and run.is_shapes):
        return None
    return _concept_scores(str(run.cache), str(run.sae), (mtime(run.cache), mtime(run.sae / "sae_weights.safetensors")),
                           int(feature))


@st.cache_data(show_spinner=False, max_entries=8)
def _labels(run_path: str, mtimes: tuple[int, ...]) -> dict[int, str]:
    run = _run(run_path, mtimes[0])
    out = {f: "/".join(c.concept for c in cs) for f, cs in recovery_by_feature(run).items()}
    table = feature_table(run)
    if table is not None:
        text = table["explanation"].to_numpy()
        explained = np.flatnonzero(text != "")
        out.update(zip(explained.tolist(), text[explained].tolist()))
    return out


def labels(run: RunDir) -> dict[int, str]:
    """feature -> short label for pickers: its explanation, else its recovered concept."""
    keys = (_mtime_of_dir(run.given), mtime(run.features), mtime(run.explanations), mtime(run.scores),
            mtime(run.recovery))
    return _labels(run.given, keys)
