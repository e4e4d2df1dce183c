"""interp.infra.durable: fsync before the rename that publishes a file, and every stage publishes through it."""

import os
import re
from pathlib import Path

import pytest

from interp.infra import durable

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("interp", "saes", "explain", "steering", "app")
# renames that publish nothing, or that publish through their own fsync: each with why
ALLOWED = {
    "interp/infra/durable.py": "the helper itself",
    "interp/infra/checkpoint.py": "moves the previous checkpoint aside (to .old) before publish() puts the new one",
}


@pytest.fixture
def calls(monkeypatch):
    """The order of fsync and rename calls, by path."""
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        seen.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    return seen


def test_write_json_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, calls):
    path = durable.write_json(tmp_path / "summary.json", {"a": 1})
    assert path.read_text() == '{"a": 1}' and oct(path.stat().st_mode & 0o777) == "0o644"
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls
    tmp = calls[1][1]
    assert calls[0][1] == tmp and calls[1][2] == str(path) and calls[2][1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left


def test_publishing_a_folder_fsyncs_every_file_in_it_first(tmp_path, calls):
    tmp = tmp_path / "ckpt.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.safetensors").write_bytes(b"x")
    (tmp / "sub" / "b.json").write_text("{}")
    durable.publish(tmp, tmp_path / "ckpt")
    synced = [c[1] for c in calls[: calls.index(next(c for c in calls if c[0] == "replace"))]]
    assert {str(tmp / "a.safetensors"), str(tmp / "sub" / "b.json"), str(tmp / "sub"), str(tmp)} <= set(synced)
    assert (tmp_path / "ckpt" / "sub" / "b.json").exists() and not tmp.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "features.h5"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with durable.publishing(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["features.h5"]


def test_every_rename_that_publishes_goes_through_the_helper():
    """A rename without an fsync before it survives kill -9 but not a power cut: only durable.publish renames."""
    pattern = re.compile(r"\bos\.(replace|rename)\(|\.(replace|rename)\((tmp|path|index|out)\b|shutil\.move\(")
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in ALLOWED:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "publish with interp.infra.durable instead:\n" + "\n".join(offenders)
