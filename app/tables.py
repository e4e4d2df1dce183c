"""The feature table: every feature's statistics, explanation and score as columns, to search,
sort, filter and page through with vectorised operations only (no per-feature Python loop on
a rerun, so 100k features stay interactive).

Explanation and score stores are read tolerantly: JSON objects, one a line, with a "feature"
and an explanation ("explanation", or "text"/"label") or score fields (the scorer's
detection.balanced_accuracy, else "score", "balanced_accuracy", "f1"); the latest record of a
feature wins, records with status "error" are skipped, unreadable lines are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from explain.aggregate import CANNOT_TELL

DENSE = 0.1  # firing rate above which a feature counts as dense (as saes.evaluate)
VAGUE = (CANNOT_TELL,)  # the explainer's answer that names nothing (explain.aggregate.CANNOT_TELL)
SORTS = {"score": "score", "density": "density", "max activation": "max", "feature": "feature",
         "mean when active": "mean_active"}  # the first is the feature list's default


def explanation_text(record: dict[str, Any]) -> str:
    """The explanation of a store record, whatever the field is called ("" if none)."""
    for key in ("explanation", "text", "label", "description"):
        v = record.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return ""


def score_value(record: dict[str, Any]) -> float:
    """One number for a score record (NaN if none): the detection's balanced accuracy where present."""
    det = record.get("detection")
    candidates = [det.get("balanced_accuracy") if isinstance(det, dict) else None,
                  record.get("score"), record.get("balanced_accuracy"), record.get("f1")]
    for v in candidates:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            return float(v)
    return float("nan")


def read_store(path: str | Path | None) -> dict[int, dict]:
    """The latest successful record per feature of a JSONL store ({} when absent)."""
    if path is None or not Path(path).is_file():
        return {}
    from interp.infra.records import read_records

    out: dict[int, dict] = {}
    for rec in read_records(path):
        f = rec.get("feature")
        if rec.get("kind") == "header" or isinstance(f, bool) or not isinstance(f, int):
            continue
        if rec.get("status", "ok") == "ok":
            out[f] = rec
        else:
            out.pop(f, None)
    return out


def build_table(summary: dict[str, np.ndarray], explanations: dict[int, dict],
                scores: dict[int, dict]) -> pd.DataFrame:
    """One row per feature: the summary statistics, explanation, score and a status column."""
    n = len(summary["density"])
    df = pd.DataFrame({"feature": np.arange(n)})
    for name in ("density", "max", "mean_active", "n_active", "image_share"):
        if name in summary:
            df[name] = summary[name]
    text = np.full(n, "", dtype=object)
    for f, rec in explanations.items():
        if 0 <= f < n:
            text[f] = explanation_text(rec)
    score = np.full(n, np.nan)
    for f, rec in scores.items():
        if 0 <= f < n:
            score[f] = score_value(rec)
            if not text[f]:
                text[f] = explanation_text(rec)
    df["explanation"] = text
    df["vague"] = pd.Series(text).str.strip().str.lower().isin(VAGUE).to_numpy()
    df["score"] = score
    if "modality" in summary:  # features/3: where the feature fires (image, text, both, dead)
        from explain.feature_reader import MODALITIES

        df["modality"] = np.asarray(MODALITIES, dtype=object)[summary["modality"]]
    dead = df["n_active"].to_numpy() == 0 if "n_active" in df else df["density"].to_numpy() == 0
    df["status"] = np.where(dead, "dead", np.where(df["density"].to_numpy() > DENSE, "dense", "live"))
    return df


@dataclass(frozen=True)
class Query:
    search: str = ""  # substring of the explanation (case-insensitive), or a feature index
    sort: str = "score"  # a key of SORTS
    descending: bool = True
    hide_dead: bool = True
    only_dense: bool = False
    only_unexplained: bool = False
    only_explained: bool = False
    hide_vague: bool = False  # drop "cannot tell" explanations
    explained_first: bool = True  # whatever the sort: explanations that name something, then "cannot tell", then
    # features not explained yet
    modality: str = "all"  # all, or one of image, text, both (features that fire there)


def explanation_group(df: pd.DataFrame) -> np.ndarray:
    """Per feature, 0: its explanation names something, 1: "cannot tell", 2: not explained yet."""
    explained = df["explanation"].to_numpy() != ""
    vague = df["vague"].to_numpy(dtype=bool) if "vague" in df else np.zeros(len(df), bool)
    return np.where(~explained, 2, np.where(vague, 1, 0)).astype(np.int8)


def select(df: pd.DataFrame, q: Query) -> np.ndarray:
    """Row positions of `df` that pass the query's filters, in its sort order (NaN scores last; ties, such as
    the unscored, densest first). With `explained_first`, the order holds within each explanation_group."""
    keep = np.ones(len(df), bool)
    status = df["status"].to_numpy()
    if q.hide_dead:
        keep &= status != "dead"
    if q.only_dense:
        keep &= status == "dense"
    explained = df["explanation"].to_numpy() != ""
    if q.only_unexplained:
        keep &= ~explained
    if q.only_explained:
        keep &= explained
    vague = df["vague"].to_numpy(dtype=bool) if "vague" in df else np.zeros(len(df), bool)
    if q.hide_vague:
        keep &= ~vague
    if q.modality != "all" and "modality" in df:
        keep &= df["modality"].to_numpy() == q.modality
    text = q.search.strip()
    if text:
        hit = df["explanation"].str.contains(text, case=False, regex=False).to_numpy(dtype=bool)
        if text.isdigit():
            hit = hit | (df["feature"].to_numpy() == int(text))
        keep &= hit
    rows = np.flatnonzero(keep)
    values = df[SORTS[q.sort]].to_numpy(dtype=np.float64)[rows]
    key = np.where(np.isnan(values), -np.inf if q.descending else np.inf, values)
    key = -key if q.descending else key
    tie = -df["density"].to_numpy(dtype=np.float64)[rows]
    keys = (tie, key, explanation_group(df)[rows]) if q.explained_first else (tie, key)
    return rows[np.lexsort(keys)]


def page(rows: np.ndarray, number: int, size: int) -> np.ndarray:
    """Page `number` (0-based, clipped to the last page) of `size` rows."""
    n_pages = max(1, -(-len(rows) // size))
    number = min(max(number, 0), n_pages - 1)
    return rows[number * size: (number + 1) * size]
