"""The one append-only JSONL record store: explanations, scores, steering generations, training
metrics, explainer replies.

One JSON object a line. `RecordLog.append` writes, flushes and fsyncs before it returns, so a run
killed at any point keeps every record appended before the kill. The only damage a kill can do
is a last line cut short (no newline): opening the log removes it, so the next append starts on
a fresh line and nothing half-written is ever read. A complete line that is not a JSON object
means the file was edited or corrupted: opening raises `RecordError` naming the line, because
silently skipping it would lose a record that the run believes it has.

`read_records` is the lenient reader for displays (the app): it yields the complete JSON-object
lines and passes over anything else, and never changes the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A record log with a complete line that is not a JSON object."""


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy and torch scalars
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def dumps(record: dict) -> str:
    return json.dumps(record, default=_jsonable)


def read_records(path: str | Path) -> Iterator[dict]:
    """The complete JSON-object lines of `path`, skipping a torn last line and any malformed line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                yield rec


class RecordLog:
    """An append-only JSONL file and the records it holds, in order (`records`).

    `durable=False` flushes each append to the operating system without an fsync: such a log survives
    a killed process but not a power cut, which suits logs that a checkpoint makes redundant (training
    metrics: a resumed run rewrites them from its checkpoint) and that are written every step."""

    def __init__(self, path: str | Path, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
        self.records: list[dict] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0  # bytes of complete lines
        for n, line in enumerate(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")):
            end = good + len(line) + 1
            if end > len(data):  # the last line has no newline: a kill came mid-write
                break
            good = end
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if not isinstance(rec, dict):
                raise RecordError(f"{self.path} line {n + 1} is not a JSON object: the file was edited or "
                                  "corrupted; fix or delete that line")
            self.records.append(rec)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def append(self, records: dict | Iterable[dict]) -> None:
        """Append one record or several (one write, one fsync)."""
        batch = [records] if isinstance(records, dict) else list(records)
        if not batch:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(dumps(r) + "\n" for r in batch))
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        self.records.extend(batch)

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Rewrite the log with only the records `predicate` keeps (a resumed run drops what it redoes).
        Written to a temporary file, fsynced and renamed over the log, so a kill leaves either version."""
        kept = [r for r in self.records if predicate(r)]
        if len(kept) == len(self.records):
            return
        from interp.infra.durable import write_text

        write_text(self.path, "".join(dumps(r) + "\n" for r in kept))
        self.records = kept
