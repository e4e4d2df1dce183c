"""Feature stores: the records of RUN/explanations.jsonl and RUN/scores.jsonl, keyed by feature.

A store is a record log (interp.infra.records): a record is appended, flushed and fsynced as soon
as a feature finishes (or fails), so a run killed at any point keeps every finished feature; a
line cut short by the kill is dropped when the store is next opened (that feature is redone).
The latest record of a feature wins: failures ({"status": "error", "error": ...}) are retried on the next run and superseded
by the success that follows. The first line is a header naming the SAE (and what made the
records), so a store is never silently continued for another SAE.

Records (one JSON object a line, after the header {"kind": "header", "store", "sae_sha256", "features",
"created"}; docs/formats.md has the full schema, which tests/test_formats.py holds the writers to):
  explanations.jsonl  feature, status (ok|error), explanation, raw, tokens_in, tokens_out, seconds,
                      model_seconds, examples (samples shown: rows of the samples table; the world
                      protocol's contrast images last), sources (top|q0..|negative), explainer,
                      explainer_config {explainer, ...ExplainerOptions, cutoff among them}, error (on
                      failure), time. The world protocol's raw is JSON {regions: [{sample, source, weight,
                      patches, description}], silent: [{sample, source, description}], captions?,
                      negative_captions?}.
  scores.jsonl        feature, status, explanation, judge, detection {n_pos, n_neg, n_unreadable,
                      balanced_accuracy, f1, auroc, recall, specificity, recall_by_source},
                      detection_oracle (the same fields, the world's ground truth describing the regions),
                      verdicts, samples, descriptions (world protocol: one per region, positives then
                      silent ones, and n_pos/n_neg count regions), iou {concept, pixels, pixels_mean,
                      tokens, n_samples} | null, concepts, names_concept, tokens_in, tokens_out, seconds,
                      error (on failure), time
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from interp.infra.records import RecordLog, read_records


class StoreError(ValueError):
    """A store that belongs to another SAE, or is not a store."""


class FeatureStore:
    """The latest record of every feature in one record log (interp.infra.records)."""

    def __init__(self, path: str | Path, header: dict | None = None):
        """`header` identifies what the records belong to; its `sae_sha256` must match an existing file's.
        Without one, an existing store is opened as it is (to read it)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self.latest: dict[int, dict] = {}
        self.header = header or {}
        if header is None and not self.path.exists():
            raise FileNotFoundError(f"no feature store at {self.path}")
        self._log = RecordLog(self.path)
        if self._log.records:
            first = self._log.records[0]
            if first.get("kind") != "header":
                raise StoreError(f"{self.path} is not an lmmscope feature store (no header line): "
                                 "move it away or pass another output path")
            if header is not None and first.get("sae_sha256") != header.get("sae_sha256"):
                raise StoreError(f"{self.path} holds records for another SAE (weights sha256 "
                                 f"{str(first.get('sae_sha256'))[:12]}, this one {str(header.get('sae_sha256'))[:12]}): "
                                 "move that file away to start over")
            self.header = first
            for rec in self._log.records[1:]:
                if isinstance(rec.get("feature"), int):
                    self.latest[rec["feature"]] = rec
        else:
            self._log.append({"kind": "header", **header, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

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
            self._log.append(record)
            self.latest[int(record["feature"])] = record


__all__ = ["FeatureStore", "StoreError", "read_records"]
