"""Shapes world v2: an open-vocabulary world whose every patch has a name.

Scenes are 64x64 images on an 8x8 grid of 8-px patches, with a 2x2 grid of position cells
(32 px each) holding at most one object each. Objects have a colour (8), a shape (5 geometric
shapes and 3 letters drawn as glyphs), a size (small objects span about 2x2 patches, large ones
3x3 to 4x4, so patches hold object edges and interiors) and a fill (solid, outline, striped;
glyphs are always solid). Backgrounds vary in tone (light, dark) and texture (plain, noisy).

Ground truth is exact: every object keeps an anti-aliased coverage mask (drawn at 4x and box
filtered), so each patch gets the fraction of it covered by every concept, including the
background, the object part (edge or interior) and the position cell. The vocabulary names
every kind of thing an SAE could find here (`concept_names`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from interp.infra.cli_config import Command, at_least, choices

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
    "orange": (245, 130, 20),
    "cyan": (30, 200, 210),
    "pink": (245, 120, 185),
}
GEOMETRIC = ("circle", "square", "triangle", "diamond", "star")
LETTERS = ("e", "k", "t")  # shape words "letter e", ...: text inside images
SHAPES = GEOMETRIC + tuple(f"letter {c}" for c in LETTERS)
SIZES = ("small", "large")
FILLS = ("solid", "outline", "striped")
TONES = {"light": (200, 235), "dark": (45, 80)}  # background grey-level ranges
TEXTURES = ("plain", "noisy")
PARTS = ("edge", "interior")
POSITIONS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = {"train": 0, "test": 1, "val": 2}
SUPERSAMPLE = 4
INTERIOR = 0.95  # a patch this fully covered by one object is its interior; less, its edge
SHOWN = 0.05  # a region showing this much of an object (of one patch) is described as (part of) it
EMPTY = 0.02  # a patch covered less than this by objects shows the background (empty regions draw from these)


BEFORE = {"striped_outline": False, "selector_last": False}  # what worlds recorded before these keys drew


class WorldConfigError(ValueError):
    """A world configuration that cannot produce valid scenes."""


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    patch: int = 8  # patch size of the organisms' vision tower: an 8x8 grid of image tokens
    grid: int = 2  # position cells per side; one object per cell at most
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    min_objects: int = 1
    max_objects: int = 4
    small: tuple[float, float] = (0.38, 0.48)  # object diameter as a fraction of its cell
    large: tuple[float, float] = (0.78, 0.92)
    color_jitter: int = 12
    noise: int = 18  # amplitude of the noisy background texture
    striped_outline: bool = True  # striped objects keep their contour (organisms v3, 2026-12-07); else bare
    # stripes, world v2's rendering (a small striped star was a few diagonal dashes)
    selector_last: bool = False  # "what shape is red ?": the colour word last, where the shape words sit in
    # "what color is the circle ?"; else "what shape is the red object ?" (docs/organisms.md, 2026-12-06)

    def __post_init__(self) -> None:
        unknown = [c for c in self.colors if c not in COLORS]
        if unknown:
            raise WorldConfigError(f"unknown colors {unknown}; known: {list(COLORS)}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise WorldConfigError(f"unknown shapes {unknown}; known: {list(SHAPES)}")
        if self.grid != 2:
            raise WorldConfigError(f"grid={self.grid}: position words exist for a 2x2 grid only; use grid=2")
        if not 1 <= self.min_objects <= self.max_objects:
            raise WorldConfigError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.grid ** 2:
            raise WorldConfigError(f"cannot place {self.max_objects} objects in {self.grid ** 2} cells "
                                   f"(one object per cell): set max_objects <= {self.grid ** 2}")
        if self.image_size % self.patch or self.image_size % self.grid:
            raise WorldConfigError(f"image_size {self.image_size} must be a multiple of patch {self.patch} "
                                   f"and of grid {self.grid}")
        if self.cell * self.small[0] < 8:
            raise WorldConfigError(f"small objects of {self.cell * self.small[0]:.1f} px are too small to draw: "
                                   f"use image_size >= {int(np.ceil(8 / self.small[0])) * self.grid}")

    @property
    def cell(self) -> int:
        return self.image_size // self.grid

    @property
    def patches(self) -> int:
        return self.image_size // self.patch

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "WorldConfig":
        """The inverse of `to_json`; a world recorded before a key existed was made as `BEFORE` says."""
        known = {f for f in cls.__dataclass_fields__}
        d = {**BEFORE, **d}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WorldObject:
    shape: str
    color: str
    size: str
    fill: str
    row: int
    col: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1, exclusive end
    rgb: tuple[int, int, int]
    coverage: np.ndarray = field(repr=False)  # [H, W] in [0, 1]: painted fraction of each pixel
    silhouette: np.ndarray = field(repr=False)  # [H, W] in [0, 1]: the filled shape (outline and stripes included)

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]

    @property
    def name(self) -> str:
        """Its description: size, fill, colour, shape ("small striped red circle", "large red letter k")."""
        fill = "" if self.shape.startswith("letter") else f"{self.fill} "
        return f"{self.size} {fill}{self.color} {self.shape}"

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "fill": self.fill, "row": self.row,
                "col": self.col, "position": self.position, "bbox": list(self.bbox), "rgb": list(self.rgb)}


@dataclass
class Scene:
    config: WorldConfig
    objects: list[WorldObject]
    tone: str
    texture: str
    background: np.ndarray = field(repr=False)  # [H, W] grey levels
    split: str = "train"
    index: int = 0
    seed: int = 0

    def render(self, highlight: np.ndarray | None = None) -> Image.Image:
        """RGB image; `highlight` (a [patches, patches] mask in [0, 1]) dims everything outside it."""
        img = np.repeat(self.background[..., None], 3, axis=2).astype(float)
        for obj in self.objects:
            a = obj.coverage[..., None]
            img = img * (1 - a) + np.asarray(obj.rgb, float) * a
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        if highlight is not None:
            img = dim_outside_patches(img, highlight, self.config.patch)
        return Image.fromarray(img, "RGB")

    def object_at(self, row: int, col: int) -> WorldObject | None:
        return next((o for o in self.objects if (o.row, o.col) == (row, col)), None)

    def object_patch_fractions(self) -> list[np.ndarray]:
        """Per object, the fraction of each patch inside its silhouette: [patches, patches]."""
        p, n = self.config.patch, self.config.patches
        return [o.silhouette.reshape(n, p, n, p).mean(axis=(1, 3)) for o in self.objects]

    def patch_coverage(self) -> dict[str, np.ndarray]:
        """Fraction of each patch belonging to each concept: {concept: [patches, patches]}.

        Object attributes (colour, shape, size, fill, "object") count the object's silhouette;
        "edge"/"interior" mark patches partly/fully inside one; "background" and its tone and
        texture count the rest; "cell <position>" is where the patch lies, whatever it holds.
        """
        cfg, n = self.config, self.config.patches
        out = {c: np.zeros((n, n)) for c in concept_names(cfg)}
        occupied = np.zeros((n, n))
        for obj, frac in zip(self.objects, self.object_patch_fractions()):
            for attr in ("color", "shape", "size", "fill"):
                out[f"{attr}:{getattr(obj, attr)}"] += frac
            out["object"] += frac
            inside = frac >= INTERIOR
            out["part:interior"] += np.where(inside, frac, 0)
            out["part:edge"] += np.where(inside, 0, frac)
            occupied += frac
        bg = np.clip(1 - occupied, 0, 1)
        out["background"] = bg
        out[f"tone:{self.tone}"] = bg.copy()
        out[f"texture:{self.texture}"] = bg.copy()
        for (r, c), word in POSITIONS.items():
            out[f"cell:{word}"] = cell_mask(cfg, r, c)
        return out

    def patch_labels(self, threshold: float = 0.05) -> dict[str, np.ndarray]:
        """Boolean concept labels per patch (`concept_labels`)."""
        return {c: concept_labels(v, (c,), threshold) for c, v in self.patch_coverage().items()}

    def to_json(self) -> dict:
        return {"split": self.split, "index": self.index, "seed": self.seed, "tone": self.tone,
                "texture": self.texture, "objects": [o.to_json() for o in self.objects]}


def concept_names(config: WorldConfig = WorldConfig()) -> list[str]:
    """Every patch-level concept of the world, as `kind:value` (plus "object" and "background")."""
    names = [f"color:{c}" for c in config.colors] + [f"shape:{s}" for s in config.shapes]
    names += [f"size:{s}" for s in SIZES] + [f"fill:{f}" for f in FILLS] + [f"part:{p}" for p in PARTS]
    names += ["object", "background"] + [f"tone:{t}" for t in TONES] + [f"texture:{t}" for t in TEXTURES]
    names += [f"cell:{p}" for p in POSITIONS.values()]
    return names


REGION_CONCEPTS = ("background", "tone:", "texture:")  # what the background is, not what an object is


def concept_labels(coverage: np.ndarray, concepts, threshold: float = 0.05) -> np.ndarray:
    """Boolean labels from coverage (last axis: `concepts`): an object's concept where it covers more
    than `threshold` of the patch, a background concept (background, its tone and texture) where it
    covers most of it. At 5%, 96% of patches hold some background, so a feature that is always on
    would "recover" the background with F1 0.98."""
    cut = np.array([0.5 if str(c).startswith(REGION_CONCEPTS) else threshold for c in concepts])
    return np.asarray(coverage) > cut


def check_concepts(names, config: WorldConfig = WorldConfig()) -> list[str]:
    """`names` if every one is a concept of the world; else a WorldConfigError listing the known ones."""
    known = concept_names(config)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WorldConfigError(f"unknown concepts {unknown}; known: {', '.join(known)}")
    return list(names)


def dim_outside_patches(img: np.ndarray, mask: np.ndarray, patch: int, keep: float = 0.25) -> np.ndarray:
    """Blend each patch towards black by how little of `mask` it has, as the explainer's views do."""
    m = np.kron(np.clip(np.asarray(mask, float), 0, 1), np.ones((patch, patch)))[..., None]
    out = img.astype(float) * (keep + (1 - keep) * m)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- drawing

_GLYPHS = {  # strokes in a unit box, (x0, y0, x1, y1)
    "e": [(0.2, 0.0, 0.2, 1.0), (0.2, 0.0, 0.85, 0.0), (0.2, 0.5, 0.75, 0.5), (0.2, 1.0, 0.85, 1.0)],
    "k": [(0.2, 0.0, 0.2, 1.0), (0.2, 0.55, 0.85, 0.0), (0.38, 0.42, 0.85, 1.0)],
    "t": [(0.1, 0.0, 0.9, 0.0), (0.5, 0.0, 0.5, 1.0)],
}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    pts = []  # star
    for i in range(10):
        ang = -np.pi / 2 + i * np.pi / 5
        rad = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    return pts


def _erode(a: np.ndarray, k: int) -> np.ndarray:
    """A square min filter of odd size `k` with the edges replicated: PIL's MinFilter, bit for bit, in a
    tenth of its time (it was most of the ground truth's cost)."""
    rows = np.lib.stride_tricks.sliding_window_view(np.pad(a, k // 2, mode="edge"), k, axis=0).min(-1)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1).min(-1)


def _draw(shape: str, fill: str, size: int, cx: float, cy: float, r: float,
          striped_outline: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(painted coverage, silhouette) of one object on a `size`-px square canvas, anti-aliased.

    `striped_outline` draws the stripes inside the outline: bare stripes on a small star or
    diamond are a few diagonal dashes with no contour to name (docs/organisms.md)."""
    S = SUPERSAMPLE
    big = Image.new("L", (size * S, size * S), 0)
    d = ImageDraw.Draw(big)
    cx, cy, r = cx * S, cy * S, r * S
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    elif shape.startswith("letter"):
        w = max(2.2 * S, r * 0.42)
        x0, y0, side = cx - r * 0.8, cy - r * 0.85, r * 1.7
        for a, b, c, e in _GLYPHS[shape.split()[1]]:
            d.line([(x0 + a * side * 0.94, y0 + b * side), (x0 + c * side * 0.94, y0 + e * side)], fill=255,
                   width=int(round(w)))
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=255)
    solid = np.asarray(big, float) / 255.0
    painted = solid
    if fill == "outline" or (fill == "striped" and striped_outline):
        border = max(5, int(round(r * 0.28)) | 1)  # odd filter size, at least ~1.3 px at 1x
        inner = _erode(np.asarray(big), border).astype(float) / 255.0
        painted = solid - inner
    if fill == "striped":
        yy, xx = np.mgrid[0: size * S, 0: size * S]
        stripes = ((xx + yy) // (2 * S)) % 2 == 0  # diagonal stripes of 2 px, period 4 px
        painted = np.maximum(painted, solid * stripes) if striped_outline else solid * stripes
    down = lambda a: a.reshape(size, S, size, S).mean(axis=(1, 3))  # noqa: E731
    return down(painted), down(solid)


def sample_scene(config: WorldConfig, index: int, split: str = "train", seed: int = 0) -> Scene:
    """Scene number `index` of a split: the same arguments always give the same scene."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index, 2])
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = sorted(int(x) for x in rng.choice(config.grid ** 2, size=n, replace=False))
    c, s = config.cell, config.image_size
    objects = []
    for cell in cells:
        row, col = divmod(cell, config.grid)
        shape = str(rng.choice(config.shapes))
        color = str(rng.choice(config.colors))
        size = str(rng.choice(SIZES))
        fill = "solid" if shape.startswith("letter") else str(rng.choice(FILLS))
        lo, hi = config.small if size == "small" else config.large
        r = c * float(rng.uniform(lo, hi)) / 2
        slack = max(0.0, c / 2 - r - 1)
        cx = col * c + c / 2 + float(rng.uniform(-slack, slack))
        cy = row * c + c / 2 + float(rng.uniform(-slack, slack))
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLORS[color]) + rng.integers(
            -config.color_jitter, config.color_jitter + 1, 3), 0, 255))
        # drawn on its own cell's canvas (4x cheaper than the whole image), then placed
        y0, x0 = row * c, col * c
        painted, solid = np.zeros((s, s)), np.zeros((s, s))
        painted[y0:y0 + c, x0:x0 + c], solid[y0:y0 + c, x0:x0 + c] = _draw(shape, fill, c, cx - x0, cy - y0, r,
                                                                          config.striped_outline)
        ys, xs = np.nonzero(solid > 0)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(WorldObject(shape, color, size, fill, row, col, bbox, rgb, painted, solid))
    tone = str(rng.choice(list(TONES)))
    texture = str(rng.choice(TEXTURES))
    level = float(rng.integers(*TONES[tone]))
    bg = np.full((s, s), level)
    if texture == "noisy":
        bg = bg + rng.integers(-config.noise, config.noise + 1, (s, s))
    return Scene(config, objects, tone, texture, np.clip(bg, 0, 255), split, index, seed)


# ---------------------------------------------------------------- questions

TASKS = ("color", "shape", "size", "fill", "at", "where", "count", "exists", "relation", "letter",
         "caption", "region", "judge", "patch")
SUBJECT_TASKS = TASKS[:10]  # the subject answers questions; the explainer also describes
EXPLAINER_TASKS = ("region", "caption", "judge", "color", "shape", "count", "where")
HIGHLIGHT_TASKS = ("region", "patch")  # asked about a highlighted region: their images are drawn with it


@dataclass
class QA:
    task: str
    question: str
    answer: str
    highlight: np.ndarray | None = None  # [patches, patches] mask shown to the model, for HIGHLIGHT_TASKS
    focus: tuple[np.ndarray, ...] = ()  # [patches, patches] coverage of each thing the question is about
    # (the object it names, both objects of a relation, the cell of "what is at P"); none for the questions
    # about the whole image. Ground truth for where an answer has to look (`TrainConfig.attention_supervision`)
    cues: tuple[str, ...] = ()  # per thing of `focus`, the question's words that name it ("red", "top left"):
    # where an answer has to look in the text first, to know which thing to look at in the image


def caption(scene: Scene) -> str:
    """Every object with its position, in reading order."""
    return " , ".join(f"{o.name} at {o.position}" for o in scene.objects)


def describe_region(scene: Scene, mask: np.ndarray) -> str:
    """What a highlighted set of patches shows, in the world's compositional vocabulary.

    "large striped red circle at top left" when it covers (most of) an object;
    "edge of ..." / "interior of ..." when only part of one; "empty <texture> <tone> background at
    <position>" when it holds no object."""
    cfg = scene.config
    mask = np.asarray(mask, float) > 0.5
    fracs = scene.object_patch_fractions()
    best, best_cov = None, 0.0
    for obj, frac in zip(scene.objects, fracs):
        cov = float((frac * mask).sum())
        if cov > best_cov:
            best, best_cov = (obj, frac), cov
    if best is None or best_cov < SHOWN:
        rows, cols = np.nonzero(mask)
        r = int(((rows.mean() + 0.5) * cfg.patch) // cfg.cell)
        c = int(((cols.mean() + 0.5) * cfg.patch) // cfg.cell)
        return f"empty {scene.texture} {scene.tone} background at {POSITIONS[(r, c)]}"
    obj, frac = best
    total = float(frac.sum())
    if best_cov >= 0.6 * total:
        return f"{obj.name} at {obj.position}"
    seen = (frac > SHOWN) & mask
    part = "interior" if (frac[seen] >= INTERIOR).mean() > 0.5 else "edge"
    return f"{part} of {obj.name} at {obj.position}"


def region_mask(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A highlighted region like the ones a feature's activation draws: a whole object, part of one
    (edge or interior patches), or empty patches within one cell.

    Parts are half of them, and an edge patch may hold as little of its object as `describe_region`
    still names (SHOWN): the explain stage describes each example's strongest patch, two in three of
    them on an object and a third of those thin edges, and an explainer trained on whole objects and
    well-covered edges described their shape, fill and even colour worse than this test said."""
    cfg, n = scene.config, scene.config.patches
    fracs = scene.object_patch_fractions()
    occupied = np.sum(fracs, axis=0) if fracs else np.zeros((n, n))
    kind = rng.random()
    if scene.objects and kind < 0.75:
        i = int(rng.integers(len(scene.objects)))
        frac = fracs[i]
        if kind < 0.25:
            return (frac > SHOWN).astype(float)
        want_interior = rng.random() < 0.3 and (frac >= INTERIOR).any()
        pool = np.argwhere(frac >= INTERIOR) if want_interior else np.argwhere((frac > SHOWN) & (frac < INTERIOR))
        if not len(pool):
            pool = np.argwhere(frac > SHOWN)
        pick = pool[rng.choice(len(pool), size=min(len(pool), int(rng.integers(1, 4))), replace=False)]
        m = np.zeros((n, n))
        m[pick[:, 0], pick[:, 1]] = 1
        return m
    empty = np.argwhere(occupied < EMPTY)
    if not len(empty):
        return (fracs[0] > SHOWN).astype(float)
    r0, c0 = empty[rng.integers(len(empty))]
    cell = lambda rc: (int(rc[0]) * cfg.patch // cfg.cell, int(rc[1]) * cfg.patch // cfg.cell)  # noqa: E731
    same = [rc for rc in empty if cell(rc) == cell((r0, c0))]
    pick = [same[j] for j in rng.choice(len(same), size=min(len(same), int(rng.integers(1, 5))), replace=False)]
    m = np.zeros((n, n))
    for r, c in pick:
        m[r, c] = 1
    return m


def patch_mask(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One highlighted patch, the region the explain stage asks about (a feature's strongest patch,
    `explain.examples.feature_region`): three times in four a patch of an object, any part of it that
    `describe_region` names (SHOWN of the patch or more), else an empty patch. What `interp organism eval`
    reports as "patch": the region test's whole objects are rare there."""
    n = scene.config.patches
    fracs = scene.object_patch_fractions()
    occupied = np.sum(fracs, axis=0) if fracs else np.zeros((n, n))
    pool = np.argwhere(occupied < EMPTY)
    if scene.objects and (rng.random() < 0.75 or not len(pool)):
        pool = np.argwhere(fracs[int(rng.integers(len(scene.objects)))] > SHOWN)
    r, c = pool[int(rng.integers(len(pool)))]
    m = np.zeros((n, n))
    m[r, c] = 1
    return m


def _holds(rel: str, a: WorldObject, b: WorldObject) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[rel]


def scene_questions(scene: Scene, rng: np.random.Generator, tasks: tuple[str, ...] = TASKS) -> list[QA]:
    """One question of each requested task this scene supports, with the ground-truth answer."""
    cfg, objs = scene.config, scene.objects
    by_shape = {s: [o for o in objs if o.shape == s] for s in cfg.shapes}
    by_color = {c: [o for o in objs if o.color == c] for c in cfg.colors}
    unique = [o for o in objs if len(by_shape[o.shape]) == 1]  # objects a shape word picks out
    unique_color = [o for o in objs if len(by_color[o.color]) == 1]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    fracs = {id(o): f for o, f in zip(objs, scene.object_patch_fractions())}
    look = lambda *os: tuple(fracs[id(o)] for o in os)  # noqa: E731
    out: list[QA] = []
    for task in tasks:
        if task in ("color", "size", "fill", "where") and unique:
            o = pick(unique)
            q = {"color": "what color is the {} ?", "size": "what size is the {} ?",
                 "fill": "what fill is the {} ?", "where": "where is the {} ?"}[task].format(o.shape)
            a = {"color": o.color, "size": o.size, "fill": o.fill, "where": o.position}[task]
            out.append(QA(task, q, a, focus=look(o), cues=(o.shape,)))
        elif task == "shape" and unique_color:
            o = pick(unique_color)
            q = f"what shape is {o.color} ?" if cfg.selector_last else f"what shape is the {o.color} object ?"
            out.append(QA(task, q, o.shape, focus=look(o), cues=(o.color,)))
        elif task == "at":
            pos = pick(list(POSITIONS))
            if objs and rng.random() < 0.75:
                pos = (o := pick(objs)).row, o.col
            o = scene.object_at(*pos)
            focus = look(o) if o else (cell_mask(cfg, *pos),)
            out.append(QA(task, f"what is at the {POSITIONS[pos]} ?", o.name if o else "nothing", focus=focus,
                          cues=(POSITIONS[pos],)))
        elif task == "count":
            out.append(QA(task, "how many objects are there ?", NUMBER_WORDS[len(objs)]))
        elif task == "exists":
            if rng.random() < 0.5:
                o = pick(objs)
                color, shape = o.color, o.shape
            else:
                color, shape = pick(list(cfg.colors)), pick(list(cfg.shapes))
                if rng.random() < 0.5:  # near misses: a present colour or a present shape
                    o = pick(objs)
                    color, shape = (o.color, shape) if rng.random() < 0.5 else (color, o.shape)
            ans = "yes" if any(o.color == color and o.shape == shape for o in objs) else "no"
            same_color = look(*by_color[color])  # where to look first: the objects of the asked colour
            out.append(QA(task, f"is there a {color} {shape} ?", ans, focus=(sum(same_color),) if same_color else (),
                          cues=(color,) if same_color else ()))
        elif task == "relation" and len(unique) >= 2:
            i, j = rng.choice(len(unique), size=2, replace=False)
            a, b = unique[int(i)], unique[int(j)]
            rel = pick(list(RELATIONS))
            out.append(QA(task, f"is the {a.shape} {rel} the {b.shape} ?", "yes" if _holds(rel, a, b) else "no",
                          focus=look(a, b), cues=(a.shape, b.shape)))
        elif task == "letter":
            letters = [o for o in objs if o.shape.startswith("letter")]
            if len(letters) == 1:
                out.append(QA(task, "what letter is in the image ?", letters[0].shape.split()[1],
                              focus=look(letters[0]), cues=("letter",)))
        elif task == "caption":
            out.append(QA(task, "describe the image .", caption(scene)))
        elif task == "judge":
            phrase = judge_phrase(scene, rng)
            out.append(QA(task, f"is there {phrase} ?", "yes" if shows(scene, phrase) else "no"))
        elif task in HIGHLIGHT_TASKS:
            m = (region_mask if task == "region" else patch_mask)(scene, rng)
            out.append(QA(task, "what is in the highlighted region ?", describe_region(scene, m), highlight=m,
                          focus=(m,)))
    return out


def cell_mask(config: WorldConfig, row: int, col: int) -> np.ndarray:
    """[patches, patches]: 1 on the patches of position cell (row, col)."""
    centres = (np.arange(config.patches) + 0.5) * config.patch // config.cell
    return np.outer(centres == row, centres == col).astype(float)


def phrase_attributes(phrase: str, config: WorldConfig = WorldConfig()) -> dict[str, str]:
    """The attributes a phrase of the world's grammar names: {"color": "red", "shape": "letter k", ...}.

    Works on any text: it picks out the world's words ("a small red object", "red circles",
    "something at top left", "empty dark background")."""
    text = " " + " ".join(phrase.lower().replace(",", " ").split()) + " "
    out: dict[str, str] = {}
    for kind, values in (("color", config.colors), ("size", SIZES), ("fill", FILLS), ("part", PARTS),
                         ("tone", tuple(TONES)), ("texture", TEXTURES)):
        for v in values:
            if f" {v} " in text:
                out[kind] = v
    for s in sorted(config.shapes, key=len, reverse=True):
        if f" {s} " in text or f" {s}s " in text or (s.startswith("letter") and f" the {s} " in text):
            out["shape"] = s
            break
    for p in sorted(POSITIONS.values(), key=len, reverse=True):
        if f" {p} " in text:
            out["cell"] = p
            break
    if " empty " in text or " background " in text:
        out["background"] = "yes"
    return out


def shows(scene: Scene, phrase: str) -> bool:
    """Ground truth: does the scene show what the phrase describes (all its attributes on one thing)?"""
    attrs = phrase_attributes(phrase, scene.config)
    if not attrs:
        return False
    if "background" in attrs:
        if attrs.get("tone", scene.tone) != scene.tone or attrs.get("texture", scene.texture) != scene.texture:
            return False
        cells = [(r, c) for (r, c), p in POSITIONS.items() if attrs.get("cell", p) == p]
        return any(scene.object_at(r, c) is None for r, c in cells)
    for o in scene.objects:
        if all(getattr(o, k) == v if k in ("color", "shape", "size", "fill") else
               (o.position == v if k == "cell" else True) for k, v in attrs.items()):
            return True
    return False


def judge_phrase(scene: Scene, rng: np.random.Generator) -> str:
    """A phrase of the explanation grammar, about half of them true of the scene."""
    cfg = scene.config
    kind = rng.random()
    if kind < 0.2:
        tone = str(rng.choice(list(TONES))) if rng.random() < 0.5 else scene.tone
        cell = f" at {rng.choice(list(POSITIONS.values()))}" if rng.random() < 0.5 else ""
        return f"empty {tone} background{cell}"
    if scene.objects and rng.random() < 0.5:
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        attrs = {"size": o.size, "fill": o.fill, "color": o.color, "shape": o.shape, "cell": o.position}
    else:
        attrs = {"size": str(rng.choice(SIZES)), "fill": str(rng.choice(FILLS)), "color": str(rng.choice(cfg.colors)),
                 "shape": str(rng.choice(cfg.shapes)), "cell": str(rng.choice(list(POSITIONS.values())))}
    keys = [k for k in attrs if rng.random() < 0.4] or [str(rng.choice(list(attrs)))]
    if attrs["shape"].startswith("letter") and "fill" in keys:
        keys.remove("fill")
        keys = keys or ["shape"]
    words = [attrs[k] for k in ("size", "fill", "color") if k in keys]
    noun = attrs["shape"] if "shape" in keys else ("object" if words else "something")
    cell = f" at {attrs['cell']}" if "cell" in keys else ""
    article = "an" if (words or [noun])[0][0] in "aeiou" else "a"
    lead = "" if noun == "something" and not words else f"{article} "
    return f"{lead}{' '.join(words + [noun])}{cell}".strip()


def vocabulary(config: WorldConfig = WorldConfig()) -> list[str]:
    """Every word a question or answer of this world can use (the organisms' tokenizer)."""
    words = set()
    for q in ("what color is the ?", "what size is the ?", "what fill is the ?", "where is the ?",
              "what shape is the object ?", "what is at the ?", "how many objects are there ?",
              "is there a ?", "what letter is in the image ?", "describe the image .",
              "what is in the highlighted region ?", "yes no nothing and , of at empty background",
              "what do the highlighted regions have in common ? cannot tell any something in cell the image "
              "also holds ; a an object objects"):
        words.update(q.split())
    for group in (config.colors, config.shapes, SIZES, FILLS, TONES, TEXTURES, PARTS, RELATIONS,
                  POSITIONS.values(), NUMBER_WORDS):
        for w in group:
            words.update(w.split())
    return sorted(words)


def contact_sheet(config: WorldConfig = WorldConfig(), n: int = 8, split: str = "test", seed: int = 0,
                  scale: int = 4) -> Image.Image:
    """Scenes with their captions, and a highlighted-region view of each: a picture of the world."""
    rng = np.random.default_rng(seed)
    tile = config.image_size * scale
    sheet = Image.new("RGB", (n * (tile + 8), 2 * (tile + 34) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        scene = sample_scene(config, i, split, seed)
        x = i * (tile + 8)
        sheet.paste(scene.render().resize((tile, tile), Image.NEAREST), (x, 0))
        for k, line in enumerate(caption(scene).split(" , ")[:2]):
            draw.text((x + 2, tile + 2 + 11 * k), line, fill="black")
        (qa,) = scene_questions(scene, rng, ("region",))
        sheet.paste(scene.render(qa.highlight).resize((tile, tile), Image.NEAREST), (x, tile + 34))
        draw.text((x + 2, 2 * tile + 36), qa.answer[:40], fill="black")
    return sheet


@dataclass
class WorldSheetConfig:
    """`interp world`: a contact sheet of scenes with their ground truth."""

    samples: int = field(default=8, metadata=at_least(1))
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
