"""The shapes world: seeded images of coloured shapes with exact ground truth.

Every object sits inside one cell of a coarse position grid, so each object has a
well-defined position word, and (with the default 16-px patches, one per cell)
every image patch has clean concept labels. Patch coverage is still computed from
the pixel masks, so any other patch size gets correct fractional labels too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from interp.infra.cli_config import Command, choices

ALL_SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
ALL_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
    "orange": (245, 130, 20),
    "cyan": (30, 200, 210),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = {"train": 0, "test": 1, "val": 2}
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered: anti-aliased edges, fractional masks


class WorldConfigError(ValueError):
    """A world configuration that cannot produce valid scenes."""


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 48
    grid: int = 3
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    min_objects: int = 1
    max_objects: int = 3
    min_scale: float = 0.6  # object size as a fraction of its cell
    max_scale: float = 0.9
    color_jitter: int = 12  # per-object RGB noise, so colour is a range, not one value
    background: tuple[int, int] = (215, 250)  # grey level range of the background

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in ALL_SHAPES]
        if unknown:
            raise WorldConfigError(f"unknown shapes {unknown}; known: {list(ALL_SHAPES)}")
        unknown = [c for c in self.colors if c not in ALL_COLORS]
        if unknown:
            raise WorldConfigError(f"unknown colors {unknown}; known: {list(ALL_COLORS)}")
        if self.grid != 3:
            raise WorldConfigError(f"grid={self.grid}: position words exist for a 3x3 grid only; use grid=3")
        if not 1 <= self.min_objects <= self.max_objects:
            raise WorldConfigError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.grid * self.grid:
            raise WorldConfigError(
                f"cannot place {self.max_objects} non-overlapping objects in a {self.grid}x{self.grid} grid "
                f"(one object per cell): set max_objects <= {self.grid * self.grid}"
            )
        if self.image_size % self.grid:
            raise WorldConfigError(f"image_size {self.image_size} is not a multiple of grid {self.grid}")
        if self.cell < 8:
            raise WorldConfigError(f"cells of {self.cell} px are too small to draw shapes: use image_size >= {8 * self.grid}")
        if not 0.2 <= self.min_scale <= self.max_scale <= 1.0:
            raise WorldConfigError(f"need 0.2 <= min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(self.colors) + tuple(self.shapes)

    def to_json(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


POSITION_WORDS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip


@dataclass
class WorldObject:
    shape: str
    color: str
    row: int
    col: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exclusive end
    rgb: tuple[int, int, int]
    coverage: np.ndarray = field(repr=False)  # [H, W] float in [0, 1]: how much of each pixel it covers

    @property
    def position(self) -> str:
        return POSITION_WORDS[(self.row, self.col)]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def mask(self) -> np.ndarray:
        return self.coverage >= 0.5

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "row": self.row, "col": self.col,
                "position": self.position, "bbox": list(self.bbox), "rgb": list(self.rgb)}


@dataclass
class Scene:
    config: WorldConfig
    objects: list[WorldObject]
    background: int
    split: str
    index: int
    seed: int

    def render(self, highlight: tuple[int, int, int, int] | None = None) -> Image.Image:
        """RGB image; `highlight` (x0, y0, x1, y1) dims everything outside that box."""
        s = self.config.image_size
        img = np.full((s, s, 3), float(self.background))
        for obj in self.objects:
            a = obj.coverage[..., None]
            img = img * (1 - a) + np.asarray(obj.rgb, float) * a
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        if highlight is not None:
            img = dim_outside(img, highlight)
        return Image.fromarray(img, "RGB")

    def patch_coverage(self, patch_size: int | None = None) -> dict[str, np.ndarray]:
        """Fraction of each patch covered by each concept: {concept: [rows, cols]}.

        Colour and shape concepts, plus "object" (any object). Fractions come from the
        anti-aliased coverage, so they are exact up to the 4x supersampling.
        """
        p = patch_size or self.config.cell
        s = self.config.image_size
        if s % p:
            raise ValueError(f"patch size {p} does not divide image size {s}")
        n = s // p
        out = {c: np.zeros((n, n)) for c in (*self.config.concepts, "object")}
        for obj in self.objects:
            frac = obj.coverage.reshape(n, p, n, p).mean(axis=(1, 3))
            for c in (obj.color, obj.shape, "object"):  # objects never overlap: sums are exact
                out[c] += frac
        return out

    def patch_labels(self, patch_size: int | None = None, threshold: float = 0.05) -> dict[str, np.ndarray]:
        """Boolean concept labels per patch: covered by more than `threshold` of its area."""
        return {c: v > threshold for c, v in self.patch_coverage(patch_size).items()}

    def object_at(self, row: int, col: int) -> WorldObject | None:
        return next((o for o in self.objects if (o.row, o.col) == (row, col)), None)

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        c = self.config.cell
        return (col * c, row * c, (col + 1) * c, (row + 1) * c)

    def to_json(self) -> dict:
        return {"split": self.split, "index": self.index, "seed": self.seed, "background": self.background,
                "objects": [o.to_json() for o in self.objects]}


def dim_outside(img: np.ndarray, box: tuple[int, int, int, int], keep: float = 0.25) -> np.ndarray:
    """Blend everything outside `box` towards black, as the explainer's marked views do."""
    x0, y0, x1, y1 = box
    out = img.astype(float) * keep
    out[y0:y1, x0:x1] = img[y0:y1, x0:x1]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "star":
        pts = []
        for i in range(10):
            ang = -np.pi / 2 + i * np.pi / 5
            rad = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
        return pts
    return None


def _draw_coverage(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    d = ImageDraw.Draw(big)
    S = SUPERSAMPLE
    cx, cy, r = cx * S, cy * S, r * S
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    else:
        d.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
    small = np.asarray(big, float).reshape(size, S, size, S).mean(axis=(1, 3)) / 255.0
    return small


def sample_scene(config: WorldConfig, index: int, split: str = "train", seed: int = 0) -> Scene:
    """Scene number `index` of a split: the same arguments always give the same scene."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(config.grid * config.grid, size=n, replace=False)
    c = config.cell
    objects = []
    for cell in sorted(int(x) for x in cells):
        row, col = divmod(cell, config.grid)
        shape = str(rng.choice(config.shapes))
        color = str(rng.choice(config.colors))
        r = c * float(rng.uniform(config.min_scale, config.max_scale)) / 2
        slack = c / 2 - r
        cx = col * c + c / 2 + float(rng.uniform(-slack, slack))
        cy = row * c + c / 2 + float(rng.uniform(-slack, slack))
        base = np.asarray(ALL_COLORS[color])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-config.color_jitter, config.color_jitter + 1, 3), 0, 255))
        cov = _draw_coverage(shape, config.image_size, cx, cy, r)
        ys, xs = np.nonzero(cov > 0)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(WorldObject(shape, color, row, col, bbox, rgb, cov))
    bg = int(rng.integers(config.background[0], config.background[1] + 1))
    return Scene(config, objects, bg, split, index, seed)


# ---------------------------------------------------------------- text tasks

TASKS = ("caption", "color", "shape", "where", "count", "exists", "region")


@dataclass
class QA:
    task: str
    question: str
    answer: str
    highlight: tuple[int, int, int, int] | None = None  # region marked in the image, for "region"


def caption(scene: Scene) -> str:
    names = [o.name for o in scene.objects]  # objects are in reading order
    if len(names) == 1:
        return names[0]
    return " , ".join(names[:-1]) + " and " + names[-1]


def scene_questions(scene: Scene, rng: np.random.Generator, tasks: tuple[str, ...] = TASKS) -> list[QA]:
    """One question of each requested task that this scene supports, answers from ground truth."""
    cfg = scene.config
    objs = scene.objects
    out: list[QA] = []
    shape_counts = {s: sum(o.shape == s for o in objs) for s in cfg.shapes}
    unique_shape = [o for o in objs if shape_counts[o.shape] == 1]
    for task in tasks:
        if task == "caption":
            out.append(QA(task, "describe the image .", caption(scene)))
        elif task == "color" and unique_shape:
            o = unique_shape[rng.integers(len(unique_shape))]
            out.append(QA(task, f"what color is the {o.shape} ?", o.color))
        elif task == "shape":
            o = objs[rng.integers(len(objs))]
            out.append(QA(task, f"what shape is at the {o.position} ?", o.shape))
        elif task == "where" and unique_shape:
            o = unique_shape[rng.integers(len(unique_shape))]
            out.append(QA(task, f"where is the {o.shape} ?", o.position))
        elif task == "count":
            out.append(QA(task, "how many objects are there ?", NUMBER_WORDS[len(objs)]))
        elif task == "exists":
            if rng.random() < 0.5:
                o = objs[rng.integers(len(objs))]
                shape, color = o.shape, o.color
            else:
                present = {(o.shape, o.color) for o in objs}
                absent = [(s, c) for s in cfg.shapes for c in cfg.colors if (s, c) not in present]
                shape, color = absent[rng.integers(len(absent))]
            ans = "yes" if any(o.shape == shape and o.color == color for o in objs) else "no"
            out.append(QA(task, f"is there a {color} {shape} ?", ans))
        elif task == "region":
            row, col = divmod(int(rng.integers(cfg.grid * cfg.grid)), cfg.grid)
            if rng.random() < 0.8 and objs:  # mostly occupied cells; empty ones teach "nothing"
                o = objs[rng.integers(len(objs))]
                row, col = o.row, o.col
            o = scene.object_at(row, col)
            out.append(QA(task, "what is in the highlighted region ?", o.name if o else "nothing",
                          highlight=scene.cell_box(row, col)))
    return out


def vocabulary(config: WorldConfig = WorldConfig()) -> list[str]:
    """Every word any question or answer of this world can use (the organisms' tokenizer)."""
    words = set()
    for q in ("describe the image .", "what color is the ?", "what shape is at the ?", "where is the ?",
              "how many objects are there ?", "is there a ?", "what is in the highlighted region ?",
              "yes no nothing and ,", "what do the highlighted regions have in common ?"):
        words.update(q.split())
    words.update(config.shapes)
    words.update(config.colors)
    for p in POSITION_WORDS.values():
        words.update(p.split())
    words.update(NUMBER_WORDS[: config.max_objects + 1])
    return sorted(words)


def contact_sheet(config: WorldConfig = WorldConfig(), n: int = 8, split: str = "test", seed: int = 0,
                  scale: int = 4, highlight: bool = True) -> Image.Image:
    """Scenes with their captions (and a highlighted-region view of each): a picture of the world."""
    rng = np.random.default_rng(seed)
    tile = config.image_size * scale
    cols = 2 if highlight else 1
    sheet = Image.new("RGB", (n * (tile + 8), cols * (tile + 22) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        scene = sample_scene(config, i, split, seed)
        x = i * (tile + 8)
        sheet.paste(scene.render().resize((tile, tile), Image.NEAREST), (x, 0))
        draw.text((x + 2, tile + 4), caption(scene).replace(" , ", ", "), fill="black")
        if highlight:
            (qa,) = scene_questions(scene, rng, ("region",))
            sheet.paste(scene.render(qa.highlight).resize((tile, tile), Image.NEAREST), (x, tile + 22))
            draw.text((x + 2, 2 * tile + 26), f"region: {qa.answer}", fill="black")
    return sheet


@dataclass
class WorldSheetConfig:
    """`interp world`: a contact sheet of scenes with their ground truth."""

    samples: int = 8
    """number of samples (scenes) on the sheet"""
    split: str = field(default="test", metadata=choices(list(SPLITS)))
    """world split"""
    seed: int = 0
    """world seed"""
    out: str = "shapes-world.png"
    """PNG contact sheet to write"""
    json: bool = False
    """also print each scene's ground truth as JSON lines"""


def world_sheet(cfg: WorldSheetConfig) -> Path:
    contact_sheet(WorldConfig(), cfg.samples, cfg.split, cfg.seed).save(cfg.out)
    if cfg.json:
        for i in range(cfg.samples):
            print(json.dumps(sample_scene(WorldConfig(), i, cfg.split, cfg.seed).to_json()))
    return Path(cfg.out)


COMMANDS = [Command("world", WorldSheetConfig, world_sheet, "render samples of the shapes world with their ground truth",
                    report=lambda out, cfg: print(f"wrote {out}"))]
