"""Data sources for caching: the shapes world, a folder of images, a local HF dataset.

Every sample carries a stable `image_ref` from which `load_image` gets the same image back
later (the explain stage and the app re-render top images from it), and a content hash.

Image references in a cache are paths (`file:/abs/path.png`, `hf:/abs/dataset:split:row`), and a run
directory may come from someone else. Whatever reads a cache's references (the app, the explainers,
which may send the images to a remote server) passes the cache's data roots, `data_roots(meta["data"])`:
the folder or dataset recorded when the cache was made. A reference outside them is refused
(UntrustedImageError) instead of read, so a crafted `file:/home/you/private.png` cannot make the app
show, or an explainer send, an image the cache was not made from.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    pass


class UntrustedImageError(DataError):
    """An image reference that points outside the data roots recorded with its cache."""


@dataclass
class Sample:
    index: int
    image_ref: str
    image: Image.Image | None
    text: str = ""  # the dataset's own text (used by a template's {text} slot)
    error: str | None = None  # why the image could not be read
    answer: str = ""  # an answer appended after the prompt (its tokens get the role "answer")

    @property
    def image_hash(self) -> str:
        return image_hash(self.image) if self.image is not None else ""


class DataSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Sample: ...
    def describe(self) -> dict: ...


def image_hash(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]


def fingerprint(source: DataSource) -> str:
    return hashlib.sha256(json.dumps(source.describe(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- sources


QA_TASKS = ("color", "shape", "size", "fill", "at", "where", "count", "exists", "relation", "letter")
"""The world's question tasks a `qa` source draws from: the subject's (interp.shapes.world.SUBJECT_TASKS)."""


class ShapesSource:
    """Scenes 0..n-1 of a shapes-world split; ref `shapes:SPLIT:INDEX:SEED`.

    With `qa`, each scene also carries one world question (the sample's text, for a template's
    {text} slot) and its ground-truth answer (appended after the prompt, role "answer"), so the
    cache holds text tokens that name the scene's colours and shapes next to its image patches.
    The task is drawn per scene from `tasks` (a scene that cannot support it gets "what is at P ?",
    which every scene supports)."""

    def __init__(self, n: int = 2000, split: str = "train", seed: int = 0, world=None, qa: bool = False,
                 tasks: tuple[str, ...] = QA_TASKS):
        from interp.shapes.world import HIGHLIGHT_TASKS, SPLITS, TASKS, WorldConfig

        if split not in SPLITS:
            raise DataError(f"unknown shapes split {split!r}; known: {', '.join(SPLITS)} (and :qa for questions)")
        unknown = [t for t in tasks if t not in TASKS or t in HIGHLIGHT_TASKS]
        if unknown:
            raise DataError(f"unknown question tasks {unknown}; known: {', '.join(QA_TASKS)}")
        self.n, self.split, self.seed, self.qa, self.tasks = n, split, seed, qa, tuple(tasks)
        self.world = world or WorldConfig()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        from interp.shapes.world import SPLITS, sample_scene, scene_questions

        ref = f"shapes:{self.split}:{i}:{self.seed}"
        scene = sample_scene(self.world, i, self.split, self.seed)
        if not self.qa:
            return Sample(i, ref, scene.render())
        import numpy as np

        rng = np.random.default_rng([self.seed, SPLITS[self.split], i, 0x51A])  # not the scene's own stream
        task = str(self.tasks[int(rng.integers(len(self.tasks)))])
        qas = scene_questions(scene, rng, (task,)) or scene_questions(scene, rng, ("at",))
        return Sample(i, ref, scene.render(), qas[0].question, answer=qas[0].answer)

    def describe(self) -> dict:
        out = {"kind": "shapes", "n": self.n, "split": self.split, "seed": self.seed, "world": self.world.to_json()}
        if self.qa:  # only then: caches made before questions existed keep their identity
            out.update(qa=True, tasks=list(self.tasks))
        return out


class FolderSource:
    """Every image file under a folder, sorted by relative path; ref `file:ABSOLUTE_PATH`."""

    def __init__(self, root: str | Path, n: int | None = None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.files = files[:n] if n else files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Sample:
        path = self.files[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
            return Sample(i, f"file:{path}", image)
        except Exception as e:  # any decoder failure means the same thing here: this image is unusable
            return Sample(i, f"file:{path}", None, error=f"{type(e).__name__}: {e}")

    def describe(self) -> dict:
        listing = [(str(p.relative_to(self.root)), p.stat().st_size) for p in self.files]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        return {"kind": "folder", "root": str(self.root), "n": len(self.files), "listing": digest}


class HFDatasetSource:
    """A local Hugging Face dataset (parquet/arrow files or a `save_to_disk` folder);
    ref `hf:PATH:SPLIT:ROW`. Columns default to the first image column and the first of
    text/caption/prompt/question; a dataset without images serves text-only models."""

    TEXT_COLUMNS = ("text", "caption", "prompt", "question")

    def __init__(self, path: str | Path, image_column: str | None = None, text_column: str | None = None,
                 split: str = "train", n: int | None = None):
        import datasets

        self.path, self.split = Path(path).resolve(), split
        if not self.path.exists():
            raise DataError(f"dataset path {path} does not exist")
        try:
            if (self.path / "dataset_info.json").exists() or (self.path / "state.json").exists() or (
                    self.path / "dataset_dict.json").exists():
                ds = datasets.load_from_disk(str(self.path))
                ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                kind = "parquet" if self.path.suffix == ".parquet" or any(self.path.rglob("*.parquet")) else "arrow"
                files = [str(self.path)] if self.path.is_file() else sorted(str(p) for p in self.path.rglob(f"*.{kind}"))
                ds = datasets.load_dataset(kind, data_files=files, split="train")
        except Exception as e:  # datasets raises many types for "this is not a dataset"
            raise DataError(f"cannot read a dataset at {path}: {type(e).__name__}: {e}") from None
        if image_column is None:
            image_column = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if text_column is None:
            text_column = next((c for c in self.TEXT_COLUMNS if c in ds.column_names), None)
        for col in (image_column, text_column):
            if col and col not in ds.column_names:
                raise DataError(f"dataset has no column {col!r}; columns: {ds.column_names}")
        if image_column is None and text_column is None:
            raise DataError(f"dataset at {path} has neither an image column nor a text column "
                            f"({', '.join(self.TEXT_COLUMNS)}); columns: {ds.column_names}")
        self.ds = ds.select(range(min(n, len(ds)))) if n else ds
        self.image_column, self.text_column = image_column, text_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Sample:
        row = self.ds[i]
        ref = f"hf:{self.path}:{self.split}:{i}"
        text = str(row[self.text_column]) if self.text_column else ""
        if self.image_column is None:
            return Sample(i, ref, None, text)
        try:
            return Sample(i, ref, _to_image(row[self.image_column]), text)
        except Exception as e:  # a broken image is recorded and skipped, whatever the decoder raised
            return Sample(i, ref, None, text, error=f"{type(e).__name__}: {e}")

    def describe(self) -> dict:
        return {"kind": "hf", "path": str(self.path), "split": self.split, "n": len(self.ds),
                "image_column": self.image_column, "text_column": self.text_column,
                "fingerprint": getattr(self.ds, "_fingerprint", None)}


def _to_image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"]).convert("RGB")
    raise DataError(f"cannot make an image of a {type(value).__name__}")


def open_source(spec: str, n: int | None = None, seed: int = 0) -> DataSource:
    """`shapes[:SPLIT][:qa]` (qa: a question and its answer with each scene), `folder:PATH` (or a directory),
    `hf:PATH[:IMAGE_COLUMN]` (or a .parquet/.arrow path)."""
    if n is not None and n <= 0:
        raise DataError(f"the number of samples (--samples) must be at least 1, got {n}")
    kind, _, rest = spec.partition(":")
    if kind == "shapes":
        words = [w for w in rest.split(":") if w]
        qa = "qa" in words
        split = [w for w in words if w != "qa"]
        if len(split) > 1:
            raise DataError(f"cannot read data source {spec!r}: write shapes[:SPLIT][:qa], e.g. shapes:train:qa")
        return ShapesSource(n or 2000, split[0] if split else "train", seed, qa=qa)
    if kind == "folder":
        return FolderSource(rest, n)
    if kind == "hf":
        path, _, column = rest.partition(":")
        return HFDatasetSource(path, column or None, n=n)
    p = Path(spec)
    if p.is_dir() and not any(p.rglob("*.parquet")) and not any(p.rglob("*.arrow")):
        return FolderSource(p, n)
    if p.exists():
        return HFDatasetSource(p, n=n)
    raise DataError(f"unknown data source {spec!r}: use shapes[:SPLIT], folder:PATH or hf:PATH[:IMAGE_COLUMN]")


def data_roots(data) -> tuple[Path, ...]:
    """The folders a cache's image references may point into, from its recorded data source (the cache's
    `data` attribute, a source's describe()): a folder source's root, a dataset's path; none for the
    shapes world (its references name generated scenes, not files)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError:
            return ()
    if not isinstance(data, dict):
        return ()
    where = data.get("root") if data.get("kind") == "folder" else data.get("path") if data.get("kind") == "hf" else None
    return (Path(where).resolve(),) if where else ()


def _check_inside(path: str, ref: str, roots) -> None:
    real = Path(path).resolve()  # symlinks followed: a link inside a root to a file outside is outside
    allowed = [Path(r).resolve() for r in roots]
    if not any(real == r or real.is_relative_to(r) for r in allowed):
        where = ", ".join(map(str, allowed)) or "none (the cache records no image folder or dataset)"
        raise UntrustedImageError(f"refusing to read image {ref}: {real} is outside the data roots recorded with the "
                                  f"cache ({where}); a run directory is trusted input, so check where this one "
                                  "came from (re-cache the images to use them)")


def load_image(ref: str, roots=None) -> Image.Image:
    """The image behind an `image_ref` written by any source above. With `roots` (`data_roots` of the
    cache the reference came from), a `file:` or `hf:` reference outside them raises UntrustedImageError."""
    kind, _, rest = ref.partition(":")
    if kind in ("file", "hf") and roots is not None:
        _check_inside(rest if kind == "file" else rest.rsplit(":", 2)[0], ref, roots)
    if kind == "shapes":
        from interp.shapes.world import WorldConfig, sample_scene

        split, index, seed = rest.split(":")
        return sample_scene(WorldConfig(), int(index), split, int(seed)).render()
    if kind == "file":
        with Image.open(rest) as im:
            return im.convert("RGB")
    if kind == "hf":
        path, split, row = rest.rsplit(":", 2)
        return HFDatasetSource(path, split=split)[int(row)].image
    raise DataError(f"unknown image reference {ref!r}")
