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

With the descriptions of silent regions (patches of the same size where the feature does not
fire), an attribute is kept only if it is also clearly rarer there (`margin`), so a cell feature
comes out "something at top left", not "an object at top left" because most cells hold one.
Attributes the world implies are not named twice: glyphs are always solid, and interior patches
belong to large objects (92% of them), so "a letter k" and "interior of an object" name their
concepts exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from interp.shapes.world import WorldConfig, phrase_attributes

CANNOT_TELL = "cannot tell"
CONTEXT = " ; the image also holds "
OBJECT_KINDS = ("size", "fill", "color", "shape")
IMPLIED = (("part", "interior", "size", "large"),)  # (kind, value) implies (kind, value) in this world


def implied(attrs: dict[str, str]) -> dict[str, str]:
    """What the world implies from `attrs` beyond themselves: a letter is solid; an interior is large."""
    out = {}
    if attrs.get("shape", "").startswith("letter"):
        out["fill"] = "solid"
    for k, v, k2, v2 in IMPLIED:
        if attrs.get(k) == v:
            out[k2] = v2
    return {k: v for k, v in out.items() if k not in attrs or attrs[k] == v}


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


def about_no_object(explanation: Explanation) -> bool:
    """Whether an explanation's region names no object (a background, a cell, or nothing): where a feature
    may need context from the rest of the image."""
    return not any(k in explanation.region for k in (*OBJECT_KINDS, "part", "object"))


def _unimplied(attrs: dict[str, str]) -> dict[str, str]:
    """`attrs` without what the rest of them imply."""
    out = dict(attrs)
    for k, v in implied(attrs).items():
        if out.get(k) == v:
            del out[k]
    return out


def attributes(text: str, world: WorldConfig = WorldConfig()) -> dict[str, str]:
    """The world's attributes a text names, with "object": "yes" when it is about an object
    (any object attribute or part, or the word "object") rather than background or a place."""
    attrs = phrase_attributes(text, world)
    if "background" not in attrs and (any(k in attrs for k in (*OBJECT_KINDS, "part"))
                                      or " object" in f" {text.lower()}"):
        attrs["object"] = "yes"
    if attrs.get("shape", "").startswith("letter"):  # glyphs are drawn solid (their descriptions say no fill)
        attrs.setdefault("fill", "solid")
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
    attrs = {} if region.strip() == CANNOT_TELL else _unimplied(attributes(region, world))
    return Explanation(attrs, {k: v for k, v in phrase_attributes(context, world).items() if k in OBJECT_KINDS})


def caption_objects(caption: str, world: WorldConfig = WorldConfig()) -> list[dict[str, str]]:
    """The objects of a caption ("small red circle at top left , large blue square at ..."), as attributes."""
    return [phrase_attributes(part, world) for part in caption.split(" , ") if part.strip()]


def _held(captions: list[str], world: WorldConfig) -> list[set[tuple[str, str]]]:
    """Per image, the object attributes it holds anywhere."""
    return [{(k, v) for o in caption_objects(c, world) for k, v in o.items() if k in OBJECT_KINDS}
            for c in captions]


def _canonical(attrs: dict[str, str]) -> dict[str, str]:
    """An explanation's attributes in the form `concept_attributes` gives: what is about an object says
    "object", what is about a background's tone or texture says "background"; nothing implied twice."""
    out = _unimplied(attrs)
    if any(k in out for k in (*OBJECT_KINDS, "part")) and "background" not in out:
        out["object"] = "yes"
    if ("tone" in out or "texture" in out) and "object" not in out:
        out["background"] = "yes"
    return out


def _shows(attrs: dict[str, str], want: dict[str, str]) -> bool:
    return all(attrs.get(k) == v for k, v in want.items())


def separation(want: dict[str, str], described: list[dict[str, str]], weights: list[float],
               silent: list[dict[str, str]]) -> tuple[float, float]:
    """(recall, balanced accuracy) of the conjunction `want` on the feature's regions (`described`, weighted)
    against the silent ones, each region's attributes completed with what they imply: what
    `best_conjunction` maximises, and what a check of its choice measures."""
    recall = sum(x for a, x in zip(described, weights) if _shows(a, want)) / sum(weights)
    return recall, (recall + sum(not _shows(a, want) for a in silent) / len(silent)) / 2


def specificity(kind: str, world: WorldConfig = WorldConfig()) -> int:
    """How many values a kind of attribute has in the world: naming a shape (one of 8) says more than
    naming a size (one of 2)."""
    from interp.shapes.world import FILLS, PARTS, POSITIONS, SIZES, TEXTURES, TONES

    return {"color": len(world.colors), "shape": len(world.shapes), "size": len(SIZES), "fill": len(FILLS),
            "part": len(PARTS), "tone": len(TONES), "texture": len(TEXTURES), "cell": len(POSITIONS)}.get(kind, 1)


def best_conjunction(described: list[dict[str, str]], weights: list[float], silent: list[dict[str, str]],
                     candidates: list[tuple[str, str]], tolerance: float = 0.02, min_accuracy: float = 0.6,
                     most: int = 4, world: WorldConfig = WorldConfig(), min_recall: float = 0.6) -> dict[str, str]:
    """The set of `candidates` (at most `most` of them) whose conjunction best tells the feature's regions
    (`described`, weighted) from the silent ones: among the sets that hold for at least `min_recall` of the
    regions, the highest balanced accuracy, and among the sets within `tolerance` of it the smallest, then
    the most specific (`specificity`: "a letter k" rather than "a solid object" when no silent region
    tells them apart). Nothing (cannot tell) when no set reaches `min_accuracy`."""
    from itertools import combinations
    from math import log

    full = [{**implied(a), **a} for a in described]
    quiet = [{**implied(a), **a} for a in silent]
    scored = []
    for n in range(1, min(most, len(candidates)) + 1):
        for combo in combinations(candidates, n):
            want = dict(combo)
            if len(want) < n:  # two values of one kind
                continue
            recall, accuracy = separation(want, full, weights, quiet)
            if recall < min_recall - 1e-9:
                continue
            scored.append((accuracy, n, sum(log(specificity(k, world)) for k in want), want))
    if not scored:
        return {}
    top = max(x[0] for x in scored)
    if top < min_accuracy:
        return {}
    return min((x for x in scored if x[0] >= top - tolerance), key=lambda x: (x[1], -x[2], -x[0]))[3]


def aggregate(descriptions: list[str], weights: list[float] | None = None, agree: float = 0.6,
              captions: list[str] | None = None, negative_captions: list[str] | None = None,
              context_margin: float = 0.35, world: WorldConfig = WorldConfig(), silent: list[str] | None = None,
              candidates: float = 0.5, tolerance: float = 0.02) -> Explanation:
    """What the descriptions of a feature's regions share, plus context.

    Without `silent`: the attributes at least `agree` of the (weighted) descriptions share. Shares
    are over all descriptions, so an example that names a different colour counts against that
    colour; "empty background" and object attributes exclude each other (a region is one or the other).
    With `silent` (descriptions of regions of the same size where the feature does not fire): among
    the attributes at least `candidates` of the descriptions share, the smallest conjunction that holds
    for at least `agree` of them and tells the two apart best (`best_conjunction`), so a colour feature whose strongest examples are mostly
    large comes out "a red object", and a cell feature "something at top left" although most cells
    hold an object. Attributes implied by the others are left out.
    Context (object attributes held somewhere in the image) is added when the region
    attributes name no object attribute (empty background, a cell, or nothing) and an attribute
    is held by at least `agree` of the activating images and by `context_margin` more of them
    than of the `negative_captions` images (its base rate)."""
    if not descriptions:
        return Explanation()
    w = [1.0] * len(descriptions) if weights is None else [max(float(x), 0.0) for x in weights]
    if len(w) != len(descriptions) or sum(w) <= 0:
        raise ValueError(f"need one positive weight per description, got {len(w)} for {len(descriptions)}")
    total = sum(w)
    described = [attributes(text, world) for text in descriptions]
    share: Counter = Counter()
    for attrs, x in zip(described, w):
        for kv in attrs.items():
            share[kv] += x / total
    if silent:
        pool = sorted(kv for kv, sh in share.items() if sh >= candidates - 1e-9)
        keep = best_conjunction(described, w, [attributes(t, world) for t in silent], pool, tolerance, world=world,
                                min_recall=agree)
    else:
        keep = {k: v for (k, v), sh in share.items() if sh >= agree - 1e-9}
        if "background" in keep:  # a region is empty or an object: keep the side most descriptions take
            keep = {k: v for k, v in keep.items() if k not in (*OBJECT_KINDS, "part", "object")}
    keep = _canonical(keep) if keep else {}
    context: dict[str, str] = {}
    if captions and about_no_object(Explanation(keep)):
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


def satisfies(description: str | dict[str, str], explanation: Explanation, caption: str | None = None,
              world: WorldConfig = WorldConfig()) -> bool | None:
    """Whether a region's description (and, for an explanation with context, its image's caption)
    shows what the explanation says: every region attribute named in the description (with what the
    world implies), and some object of the caption holding every context attribute. None: the
    description names nothing of the world (unreadable); an explanation with no attributes
    (cannot tell) is shown by nothing."""
    attrs = attributes(description, world) if isinstance(description, str) else dict(description)
    if not attrs:
        return None
    if not explanation.region and not explanation.context:
        return False
    attrs = {**implied(attrs), **attrs}
    if any(attrs.get(k) != v for k, v in explanation.region.items()):
        return False
    if explanation.context:
        objects = caption_objects(caption or "", world)
        return any(all(o.get(k) == v for k, v in explanation.context.items()) for o in objects)
    return True


def names_exactly(explanation: Explanation, concept: str) -> bool:
    """Whether the explanation names the concept and requires nothing else: "a red object" names
    color:red; "a green triangle" names neither green nor triangle."""
    return explanation.region == concept_attributes(concept) and not explanation.context
