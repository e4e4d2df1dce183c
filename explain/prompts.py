"""What explainers and judges are asked, and how their answers are read.

Two protocols share these helpers:

- world: the shapes organisms speak only the shapes world's vocabulary, so each marked example
  is one "what is in the highlighted region ?" question (the task they were trained on), and the
  per-example answers are aggregated into the words most examples share (`aggregate_regions`).
  The judge asks the world's "is there a {color} {shape} ?" about every pair the explanation
  allows (`judge_questions`).
- generic: any instruction-following VLM gets all marked examples in one prompt and is asked
  for a one-line explanation, or "cannot tell"; the judge gets the explanation and one image
  and answers yes or no.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from interp.shapes.world import WorldConfig

CANNOT_TELL = "cannot tell"
NOTHING = "nothing"
REGION_QUESTION = "what is in the highlighted region ?"
MAX_EXPLANATION_CHARS = 200

EXPLAIN_PROMPT = (
    "You are given {n} example images for one feature of a vision model. In each marked image, the regions where "
    "the feature is active are shown normally and everything else is dimmed.{originals} What do the highlighted "
    "regions have in common? Answer with one short line of a few words (for example: red objects, circles, "
    "the sky, text on signs). If they have nothing clear in common, answer exactly: cannot tell."
)
ORIGINALS_NOTE = " Each example is shown twice: first the original image, then the marked image."
JUDGE_PROMPT = (
    'A feature of a vision model responds to: "{explanation}". Does this image contain that? Answer yes or no.'
)

_CANNOT_TELL = re.compile(r"\b(cannot tell|can ?not tell|can't tell|unclear|unknown|not sure|no clear|nothing in common|"
                          r"no common|i don't know|hard to say|impossible to tell)\b")
_PREFIX = re.compile(r"^\s*(explanation|answer|feature|the feature|common)\s*[:\-]\s*", re.I)


class GarbageAnswer(ValueError):
    """A model reply that cannot be read as an answer (empty, or not text)."""


def one_line(text: str | None) -> str:
    """The explanation in a reply: its first non-empty line, without a label, quotes or a final period.
    Replies that say they cannot tell come back as exactly CANNOT_TELL."""
    if not isinstance(text, str) or not text.strip():
        raise GarbageAnswer(f"empty answer {text!r}")
    line = next(line for line in text.splitlines() if line.strip()).strip()
    line = _PREFIX.sub("", line).strip().strip("\"'`*").strip().rstrip(".").strip()
    if not line:
        raise GarbageAnswer(f"no explanation in the answer {text[:80]!r}")
    if _CANNOT_TELL.search(line.lower()):
        return CANNOT_TELL
    return line[:MAX_EXPLANATION_CHARS]


def yes_no(text: str | None) -> bool | None:
    """True for yes, False for no (the answer's first word), None when it is neither."""
    if not isinstance(text, str):
        return None
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    return {"yes": True, "no": False, "true": True, "false": False}.get(words[0])


# ---------------------------------------------------------------- the shapes world's vocabulary


@dataclass(frozen=True)
class WorldTerms:
    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    nothing: bool = False

    @property
    def words(self) -> tuple[str, ...]:
        return self.colors + self.shapes

    def text(self) -> str:
        return " ".join(self.words) if self.words else (NOTHING if self.nothing else CANNOT_TELL)


def world_terms(text: str, world: WorldConfig = WorldConfig()) -> WorldTerms:
    """The world's colour and shape words a text names (plurals too: "circles", "crosses")."""
    words = re.findall(r"[a-z]+", text.lower())
    singular = {w: w[:-2] if w.endswith("sses") else w[:-1] if w.endswith("s") else w for w in words}
    found = set(words) | set(singular.values())
    return WorldTerms(tuple(c for c in world.colors if c in found), tuple(s for s in world.shapes if s in found),
                      NOTHING in found)


def names_concept(text: str, concept: str, world: WorldConfig = WorldConfig()) -> bool:
    return concept in world_terms(text, world).words


def aggregate_regions(answers: list[str], agree: float = 0.6, weights: list[float] | None = None,
                      world: WorldConfig = WorldConfig()) -> WorldTerms:
    """The words that at least `agree` of the per-example region answers share.

    "red circle", "red square", "red cross" -> red; "red circle", "blue circle" -> circle; both
    words when both are consistent. Shares are over all answers, so answers that name no object
    count against every word; if most say "nothing", the feature marks empty regions. Nothing
    consistent -> no words (the explanation "cannot tell"). `weights` (the feature's activation
    on each marked region, relative to its max) make strong examples count more than the weak
    tail, where a feature often fires a little on anything.
    """
    if not answers:
        return WorldTerms((), ())
    w = [1.0] * len(answers) if weights is None else [max(float(x), 0.0) for x in weights]
    if len(w) != len(answers) or sum(w) <= 0:
        raise ValueError(f"need one positive weight per answer, got {len(w)} weights for {len(answers)} answers")
    parsed = [world_terms(a, world) for a in answers]
    share: Counter = Counter()
    for t, x in zip(parsed, w):
        for word in set(t.words):
            share[word] += x / sum(w)
    keep = {word for word, s in share.items() if s >= agree - 1e-9}
    nothing = sum(x for t, x in zip(parsed, w) if t.nothing and not t.words) / sum(w) >= agree - 1e-9
    return WorldTerms(tuple(c for c in world.colors if c in keep), tuple(s for s in world.shapes if s in keep),
                      nothing and not keep)


def judge_questions(terms: WorldTerms, world: WorldConfig = WorldConfig()) -> list[str]:
    """World questions whose any "yes" means an image shows the explanation.

    The world's VQA can only ask "is there a {color} {shape} ?", so a colour-only explanation
    is asked about with every shape, a shape-only one with every colour, and a conjunction
    as itself. No words (cannot tell, nothing): no question, the image does not show it.
    """
    if not terms.words:
        return []
    colors = terms.colors or world.colors
    shapes = terms.shapes or world.shapes
    return [f"is there a {c} {s} ?" for c in colors for s in shapes]
