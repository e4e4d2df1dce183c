"""Publishing a file so that neither a kill nor a power cut leaves half of it: the one helper every
stage uses.

A rename is atomic, so a reader sees the old file or the new one after a kill -9. It is not durable:
after a power cut the file system may have recorded the rename but not yet the data, and the new name
then points at zeros or at nothing. The order that survives both is: write to a temporary name in the
same folder, fsync the file (a folder: every file in it, then the folder), rename, then fsync the
parent folder so the rename itself reaches the disk.

    publish(tmp, path)                   # tmp is complete: make it `path`
    write_bytes(path, data)              # temporary file + publish
    write_json(path, obj, indent=1)      # the same for JSON (summaries, eval.json, run records)
    with publishing(path) as tmp: ...    # write tmp (h5py, safetensors); published when the block ends,
                                         # removed when it raises
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a folder's files (recursively) and then the folder itself."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            fsync_path(child)
        _fsync_dir(path)
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the complete file or folder `tmp` durable, rename it to `path` (atomically replacing a file
    there), and fsync `path`'s folder so the rename survives a power cut. Returns `path`."""
    tmp, path = Path(tmp), Path(path)
    fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _tmp_name(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def publishing(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path next to `path` to write into; published to `path` when the block ends, removed
    (and `path` left as it was) when the block raises. The temporary file exists, empty, on entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    os.chmod(tmp, mode)  # mkstemp's 0600 would hide the file from everyone else
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably."""
    path = Path(path)
    with publishing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """`obj` as JSON at `path`, atomically and durably (keyword arguments go to json.dumps)."""
    return write_text(path, json.dumps(obj, **dumps))
