"""Append-only JSONL stores keyed by feature (RUN/explanations.jsonl, RUN/scores.jsonl).

A record is appended, flushed and fsynced as soon as a feature finishes (or fails), so a run
killed at any point keeps every finished feature; a line cut short by the kill is dropped
when the store is next opened (that feature is simply redone). The latest record of a feature
wins: failures ({"status": "error", "error": ...}) are retried on the next run and superseded
by the success that follows. The first line is a header naming the SAE (and what made the
records), so a store is never silently continued for another SAE.

Records (one JSON object a line, after the header {"kind": "header", "store", "sae_sha256", "features"}):
  explanations.jsonl  feature, status (ok|error), explanation, raw, tokens_in, tokens_out, seconds,
                      model_seconds, examples (samples-table rows shown), sources (top|q0..), explainer,
                      explainer_config, error (on failure), time
  scores.jsonl        feature, status, explanation, judge, detection {n_pos, n_neg, n_unreadable,
                      balanced_accuracy, f1, auroc, recall, specificity, recall_by_source}, verdicts,
                      images, iou {concept, pixels, pixels_mean, tokens, n_images} | null, concepts,
                      names_concept, tokens_in, tokens_out, seconds, error (on failure), time
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class StoreError(ValueError):
    """A store that belongs to another SAE, or is not a store."""


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The complete JSON-object lines of a file (a torn last line is skipped)."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                yield rec


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so appends start on a fresh line."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                f.truncate(pos - step + i + 1)
                return
            pos -= step
        f.truncate(0)


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


class FeatureStore:
    """The latest record of every feature in one JSONL file."""

    def __init__(self, path: str | Path, header: dict | None = None):
        """`header` identifies what the records belong to; its `sae_sha256` must match an existing file's.
        Without one, an existing store is opened as it is (to read it)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self.latest: dict[int, dict] = {}
        self.header = header or {}
        if header is None and not self.path.exists():
            raise FileNotFoundError(f"no feature store at {self.path}")
        if self.path.exists() and self.path.stat().st_size:
            _drop_torn_tail(self.path)
            records = iter(read_jsonl(self.path))
            first = next(records, None)
            if first is None or first.get("kind") != "header":
                raise StoreError(f"{self.path} is not an lmmscope feature store (no header line): "
                                 "move it away or pass another output path")
            if header is not None and first.get("sae_sha256") != header.get("sae_sha256"):
                raise StoreError(f"{self.path} holds records for another SAE (weights sha256 "
                                 f"{str(first.get('sae_sha256'))[:12]}, this one {str(header.get('sae_sha256'))[:12]}): "
                                 "pass another output path or move that file away")
            self.header = first
            for rec in records:
                if isinstance(rec.get("feature"), int):
                    self.latest[rec["feature"]] = rec
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.path, {"kind": "header", **header, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def done(self, feature: int, **match: Any) -> bool:
        """Whether the feature's latest record is a success (with these field values, if given)."""
        rec = self.latest.get(feature)
        return rec is not None and rec.get("status") == "ok" and all(rec.get(k) == v for k, v in match.items())

    def ok(self) -> dict[int, dict]:
        return {f: r for f, r in self.latest.items() if r.get("status") == "ok"}

    def failed(self) -> dict[int, dict]:
        return {f: r for f, r in self.latest.items() if r.get("status") == "error"}

    def put(self, record: dict) -> None:
        record = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with self._lock:
            append_jsonl(self.path, record)
            self.latest[int(record["feature"])] = record
