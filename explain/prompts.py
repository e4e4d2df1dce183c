"""What explainers and judges are asked, and how their answers are read.

Two protocols share these helpers:

- world: the shapes organisms speak only the shapes world's grammar, so each example is one
  region question, "what is in the highlighted region ?", on the image dimmed outside the
  patches where the feature fires (the task they were trained on); the answers ("edge of small
  striped red circle at top left", "empty noisy dark background at top right") are aggregated
  into the attributes most examples share (explain.aggregate), and the images' captions
  ("describe the image .") give the context a feature may need. Detection describes held-out
  regions the same way and compares attributes (explain.scoring).
- generic: any instruction-following VLM gets all marked examples in one prompt and is asked
  for a one-line explanation, or "cannot tell"; the judge gets the explanation and one image
  and answers yes or no.
"""

from __future__ import annotations

import re
from explain.aggregate import CANNOT_TELL

REGION_QUESTION = "what is in the highlighted region ?"
CAPTION_QUESTION = "describe the image ."
REGION_TOKENS = 12  # "interior of large striped purple diamond at bottom right" and its end
CAPTION_TOKENS = 36  # four objects with their places, commas between
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
