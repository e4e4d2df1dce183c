"""From per-example region descriptions to one explanation, in the world's open vocabulary.

The explainer describes each highlighted region on its own ("small striped red circle at top
left", "edge of large blue square at bottom right", "empty noisy dark background at top right");
the explanation keeps the attributes most examples share, so a colour feature comes out "a red
object" (any shape, size or place) and a cell feature "something at top left" (anything), not
"cannot tell". Where the regions share nothing the background does not explain, the images'
captions are compared with those of images where the feature is silent: an attribute most
activating images hold, and clearly more often than the others, is named as context
("empty background ; the image also holds a red object"), because causal attention lets an
empty patch know what came before it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from interp.shapes.world import WorldConfig, phrase_attributes

CANNOT_TELL = "cannot tell"
CONTEXT = " ; the image also holds "
OBJECT_KINDS = ("size", "fill", "color", "shape")


@dataclass(frozen=True)
class Explanation:
    """What a feature responds to: attributes of the region, and of the rest of the image."""

    region: dict[str, str] = field(default_factory=dict)  # kind -> value ("color": "red", "background": "yes")
    context: dict[str, str] = field(default_factory=dict)  # object attributes the image also holds

    def text(self) -> str:
        if not self.region and not self.context:
            return CANNOT_TELL
        head = phrase(self.region) if self.region else CANNOT_TELL
        return head + (CONTEXT + phrase(self.context) if self.context else "")


def attributes(text: str, world: WorldConfig = WorldConfig()) -> dict[str, str]:
    """The world's attributes a text names, with "object": "yes" when it is about an object
    (any object attribute or part, or the word "object") rather than background or a place."""
    attrs = phrase_attributes(text, world)
    if "background" not in attrs and (any(k in attrs for k in (*OBJECT_KINDS, "part"))
                                      or " object" in f" {text.lower()}"):
        attrs["object"] = "yes"
    return attrs


def concept_attributes(concept: str) -> dict[str, str]:
    """What an explanation of exactly this concept holds ("color:red" -> a red object)."""
    if concept in ("object", "background"):
        return {concept: "yes"}
    kind, value = concept.split(":", 1)
    if kind in ("tone", "texture"):
        return {kind: value, "background": "yes"}
    if kind == "cell":
        return {kind: value}
    return {kind: value, "object": "yes"}


def phrase(attrs: dict[str, str]) -> str:
    """The grammar's phrase for a set of attributes: "a small red object at top left", "a letter k",
    "edge of an object", "empty dark background at top right", "something at top left"."""
    cell = f" at {attrs['cell']}" if "cell" in attrs else ""
    if "background" in attrs:
        words = [attrs[k] for k in ("texture", "tone") if k in attrs]
        return " ".join(["empty", *words, "background"]) + cell
    words = [attrs[k] for k in ("size", "fill", "color") if k in attrs]
    if "shape" in attrs or words or "object" in attrs:
        head = " ".join(words + [attrs.get("shape", "object")])
        head = ("an " if head[0] in "aeiou" else "a ") + head
    else:
        head = "something"
    part = f"{attrs['part']} of " if "part" in attrs else ""
    return f"{part}{head}{cell}"


def parse(text: str, world: WorldConfig = WorldConfig()) -> Explanation:
    """An explanation read back from its text (or from any model's free text)."""
    region, _, context = text.partition(CONTEXT.strip())
    attrs = {} if region.strip() == CANNOT_TELL else attributes(region, world)
    return Explanation(attrs, {k: v for k, v in phrase_attributes(context, world).items() if k in OBJECT_KINDS})


def caption_objects(caption: str, world: WorldConfig = WorldConfig()) -> list[dict[str, str]]:
    """The objects of a caption ("small red circle at top left , large blue square at ..."), as attributes."""
    return [phrase_attributes(part, world) for part in caption.split(" , ") if part.strip()]


def _held(captions: list[str], world: WorldConfig) -> list[set[tuple[str, str]]]:
    """Per image, the object attributes it holds anywhere."""
    return [{(k, v) for o in caption_objects(c, world) for k, v in o.items() if k in OBJECT_KINDS}
            for c in captions]


def aggregate(descriptions: list[str], weights: list[float] | None = None, agree: float = 0.6,
              captions: list[str] | None = None, negative_captions: list[str] | None = None,
              context_margin: float = 0.35, world: WorldConfig = WorldConfig()) -> Explanation:
    """The attributes at least `agree` of the (weighted) descriptions share, plus context.

    Shares are over all descriptions, so an example that names a different colour counts against
    that colour. "Empty background" and object attributes exclude each other: a region is one or
    the other. Context (object attributes held somewhere in the image) is added when the region
    attributes name no object attribute (empty background, a cell, or nothing) and an attribute
    is held by at least `agree` of the activating images and by `context_margin` more of them
    than of the `negative_captions` images (its base rate)."""
    if not descriptions:
        return Explanation()
    w = [1.0] * len(descriptions) if weights is None else [max(float(x), 0.0) for x in weights]
    if len(w) != len(descriptions) or sum(w) <= 0:
        raise ValueError(f"need one positive weight per description, got {len(w)} for {len(descriptions)}")
    total = sum(w)
    share: Counter = Counter()
    for text, x in zip(descriptions, w):
        for kv in attributes(text, world).items():
            share[kv] += x / total
    keep = {k: v for (k, v), s in share.items() if s >= agree - 1e-9}
    context: dict[str, str] = {}
    if captions and not any(k in keep for k in OBJECT_KINDS):
        pos = _held(captions, world)
        neg = _held(negative_captions or [], world)
        rates = Counter(kv for held in pos for kv in held)
        base = Counter(kv for held in neg for kv in held)
        best = None
        for kv, n in sorted(rates.items()):
            r, b = n / len(pos), (base[kv] / len(neg) if neg else 0.0)
            if r >= agree - 1e-9 and r - b >= context_margin and (best is None or r - b > best[0]):
                best = (r - b, kv)
        if best:
            context = {best[1][0]: best[1][1]}
    return Explanation(keep, context)


def names_exactly(explanation: Explanation, concept: str) -> bool:
    """Whether the explanation names the concept and requires nothing else: "a red object" names
    color:red; "a green triangle" names neither green nor triangle."""
    return explanation.region == concept_attributes(concept) and not explanation.context
