"""The one record log: appends survive a kill, a torn last line is cut, a corrupt line is named, a resume
rewrites atomically; and the one resume identity check's diff format."""

import json

import pytest

from interp.infra.identity import IdentityError, check_identity, differences, ensure_identity
from interp.infra.records import RecordError, RecordLog, read_records


def test_a_torn_last_line_is_cut_and_appends_start_on_a_fresh_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RecordLog(path)
    log.append({"step": 1})
    log.append([{"step": 2}, {"step": 3}])
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-write
    again = RecordLog(path)
    assert [r["step"] for r in again] == [1, 2, 3] and path.read_text().endswith("}\n")
    again.append({"step": 4})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_corrupt_complete_line_is_named_and_displays_skip_it(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\nnot json\n[1, 2]\n{"a": 2}\n{"a": 3')
    with pytest.raises(RecordError, match=r"log.jsonl line 2 is not a JSON object: the file was edited or corrupted"):
        RecordLog(path)
    assert list(read_records(path)) == [{"a": 1}, {"a": 2}]  # lenient: the torn last line and the rest skipped
    assert list(read_records(tmp_path / "absent.jsonl")) == []


def test_keep_rewrites_atomically_and_durable_is_a_choice(tmp_path, monkeypatch):
    import os

    path = tmp_path / "metrics.jsonl"
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    log = RecordLog(path, durable=False)
    log.append([{"step": s} for s in range(1, 6)])
    assert synced == []  # flushed, not fsynced
    log.keep(lambda r: r["step"] <= 3)  # a resume from step 3 drops what it redoes: a published rewrite, fsynced
    assert [r["step"] for r in RecordLog(path)] == [1, 2, 3] and synced and sorted(p.name for p in tmp_path.iterdir()) \
        == ["metrics.jsonl"]
    before = len(synced)
    RecordLog(path).append({"step": 4})  # durable by default: one fsync per append
    assert len(synced) == before + 1


def test_one_diff_format_for_every_resume(tmp_path):
    recorded = {"sae": {"k": 8, "arch": "topk"}, "train": {"lr": 0.003}, "roles": ("image_patch",)}
    check_identity(recorded, {"sae": {"arch": "topk", "k": 8}, "train": {"lr": 0.003}, "roles": ["image_patch"]},
                   "x", "y")  # tuples and lists, key order: the same identity
    assert differences(recorded, {"sae": {"k": 4, "arch": "topk"}, "train": {}}) == [
        "roles: recorded ('image_patch',), now None", "sae.k: recorded 8, now 4",
        "train.lr: recorded 0.003, now None"]
    with pytest.raises(IdentityError, match=r"^checkpoint c was made with other settings \(sae.k: recorded 8, now 4\): "
                                            r"start over$"):
        check_identity(recorded, {**recorded, "sae": {"k": 4, "arch": "topk"}}, "checkpoint c", "start over")
    path = tmp_path / "identity.json"
    ensure_identity(path, {"mode": "add"}, "the sweep", "use another name")  # recorded the first time
    ensure_identity(path, {"mode": "add"}, "the sweep", "use another name")
    with pytest.raises(IdentityError, match=r"the sweep was made with other settings \(mode: recorded 'add', now "
                                            r"'clamp'\): use another name"):
        ensure_identity(path, {"mode": "clamp"}, "the sweep", "use another name")
