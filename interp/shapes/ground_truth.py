"""Ground-truth concept labels for cached tokens of the shapes world.

Each cached image token knows its pixel box in the original image (the token table), and each
shapes-world image can be regenerated from its reference, so every token gets the exact
fraction of its box that each concept of the world covers (`world.concept_names`: colour,
shape, size, fill, object part, object, background and its tone and texture, position cell),
whatever the model's patch geometry. On the organisms' own 8-px patches this is exactly
`Scene.patch_coverage`. Later stages (SAE recovery, explanation scoring, the app) read labels
here; scoring features against them is `interp.shapes.concepts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from interp.shapes.world import (INTERIOR, POSITIONS, WorldConfig, check_concepts, concept_labels, concept_names,
                                 sample_scene)


@dataclass
class TokenConcepts:
    concepts: tuple[str, ...]
    coverage: np.ndarray  # [rows, concepts] fraction of the token's box each concept covers
    rows: np.ndarray  # which rows of the cache have labels (image tokens of shapes-world samples)

    def labels(self, threshold: float = 0.05) -> np.ndarray:
        """[rows, concepts] bool: an object's concept covers more than `threshold` of the token's box, a
        background concept most of it (`world.concept_labels`)."""
        return concept_labels(self.coverage, self.concepts, threshold)


def parse_shapes_ref(ref: str) -> tuple[str, int, int] | None:
    """(split, index, seed) of a `shapes:SPLIT:INDEX:SEED` image reference, else None."""
    parts = ref.split(":")
    if len(parts) != 4 or parts[0] != "shapes":
        return None
    return parts[1], int(parts[2]), int(parts[3])


def scene_of(ref: str, world: WorldConfig = WorldConfig()):
    parsed = parse_shapes_ref(ref)
    if parsed is None:
        raise ValueError(f"{ref!r} is not a shapes-world image reference (shapes:SPLIT:INDEX:SEED)")
    split, index, seed = parsed
    return sample_scene(world, index, split, seed)


def _box_means(image: np.ndarray, x0, y0, x1, y1, area) -> np.ndarray:
    ii = np.pad(image.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image: every box mean O(1)
    return (ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) / area


def box_coverage(scene, boxes: np.ndarray, concepts: tuple[str, ...] | None = None) -> np.ndarray:
    """[len(boxes), len(concepts)]: the fraction of each pixel box each concept covers.

    Object attributes count the object's silhouette; "part:interior" / "part:edge" the objects
    that fill at least / less than `INTERIOR` of the box; the background and its tone and
    texture what no object covers; "cell:P" the part of the box inside position cell P."""
    cfg = scene.config
    concepts = tuple(concept_names(cfg)) if concepts is None else tuple(check_concepts(concepts, cfg))
    s = cfg.image_size
    x0 = np.clip(np.floor(boxes[:, 0]).astype(int), 0, s)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(int), 0, s)
    x1 = np.clip(np.ceil(boxes[:, 2]).astype(int), 0, s)
    y1 = np.clip(np.ceil(boxes[:, 3]).astype(int), 0, s)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    mean = lambda image: _box_means(image, x0, y0, x1, y1, area)  # noqa: E731
    out = {c: np.zeros(len(boxes)) for c in concept_names(cfg)}
    occupied = np.zeros(len(boxes))
    for obj in scene.objects:
        frac = mean(obj.silhouette)
        for attr in ("color", "shape", "size", "fill"):
            out[f"{attr}:{getattr(obj, attr)}"] += frac
        out["object"] += frac
        out["part:interior"] += np.where(frac >= INTERIOR, frac, 0)
        out["part:edge"] += np.where(frac >= INTERIOR, 0, frac)
        occupied += frac
    bg = np.clip(1 - occupied, 0, 1)
    out["background"] = bg
    out[f"tone:{scene.tone}"] = bg
    out[f"texture:{scene.texture}"] = bg
    cell = cfg.cell
    for (r, c), word in POSITIONS.items():
        m = np.zeros((s, s))
        m[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 1
        out[f"cell:{word}"] = mean(m)
    return np.stack([out[c] for c in concepts], axis=1) if concepts else np.zeros((len(boxes), 0))


def token_concepts(reader, world: WorldConfig = WorldConfig(), with_object: bool = True) -> TokenConcepts:
    """Concept coverage of every image token of the cache that comes from a shapes-world image
    (`with_object=False` leaves out the catch-all "object")."""
    concepts = tuple(c for c in concept_names(world) if with_object or c != "object")
    tokens, refs = reader.tokens, reader.image_refs  # tokens["sample"] is a row of the samples table
    has_box = tokens["x1"] > tokens["x0"]
    rows_all = np.flatnonzero(has_box)
    coverage = np.zeros((len(rows_all), len(concepts)))
    keep = np.zeros(len(rows_all), bool)
    order = np.argsort(tokens["sample"][rows_all], kind="stable")
    sorted_rows = rows_all[order]
    bounds = np.flatnonzero(np.diff(tokens["sample"][sorted_rows])) + 1
    for group in np.split(np.arange(len(sorted_rows)), bounds):
        if not len(group):
            continue
        sample = int(tokens["sample"][sorted_rows[group[0]]])
        if parse_shapes_ref(refs[sample]) is None:
            continue
        rows = sorted_rows[group]
        boxes = np.stack([tokens[k][rows] for k in ("x0", "y0", "x1", "y1")], axis=1).astype(float)
        coverage[order[group]] = box_coverage(scene_of(refs[sample], world), boxes, concepts)
        keep[order[group]] = True
    if not keep.any():
        raise ValueError("this cache holds no image tokens of shapes-world images, so it has no ground truth; "
                         "cache with --data shapes")
    return TokenConcepts(concepts, coverage[keep], rows_all[keep])


def object_mask(image_ref: str, attributes: dict[str, str] | None = None,
                world: WorldConfig = WorldConfig()) -> np.ndarray | None:
    """[H, W] bool: the objects with all those attributes ({"color": "red", "shape": "circle"}; empty:
    any object); None for an image that is not from the shapes world."""
    if parse_shapes_ref(image_ref) is None:
        return None
    scene = scene_of(image_ref, world)
    out = np.zeros((world.image_size, world.image_size), bool)
    for o in scene.objects:
        if all(getattr(o, k) == v for k, v in (attributes or {}).items() if k in ("color", "shape", "size", "fill")):
            out |= o.silhouette > 0.5
    return out


def token_labels(image_ref: str, tokens: np.ndarray, concept: str, world: WorldConfig = WorldConfig(),
                 threshold: float = 0.05) -> np.ndarray:
    """Per token-table row: the concept's label for its pixel box, as recovery labels (`world.concept_labels`)."""
    boxes = np.stack([tokens[k] for k in ("x0", "y0", "x1", "y1")], axis=1).astype(float)
    return concept_labels(box_coverage(scene_of(image_ref, world), boxes, (concept,)), (concept,), threshold)[:, 0]
