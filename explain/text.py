"""Explanations of text features, in the style of EleutherAI's delphi: marked token contexts in, one line out.

A text example is one sample's text tokens (prompt, template and answer rows of the cache, in
position order) with the feature's activation on each (`load_contexts`, re-encoded like the image
examples). The explainer sees:

- the top-activating contexts and contexts from the quantile bands of the feature's per-sample text
  values (explain.examples with modality "text"), each with its active tokens marked `<<tok>>`
  (consecutive active tokens share one pair of marks) and, optionally, a line of (token, activation
  0..10) pairs; and
- a few random contexts on which the feature is zero everywhere in the text (counterexamples).

Scoring runs on held-out contexts (the explainer never saw them):

- detection: the judge reads an unmarked context and says whether the feature is in it;
- fuzzing: the judge reads a marked context and says whether every marked token fits the
  explanation; activating contexts carry their true marks, non-activating ones as many marks on
  random tokens as an activating context has on average (delphi's default fuzzing).

Both give balanced accuracy (explain.scoring.detection_metrics) at P(yes) >= 0.5.

Two protocols (explainer and judge in one object, as explain.explainers):

- generic: any OpenAI-compatible LMM (or local HF model): one request with all examples, the answer's
  `[EXPLANATION]:` line (else its first line); the judge answers yes or no per context (P(yes)
  from logprobs where the server gives them).
- tokens: no model. The explanation is the set of marked words that best tells the explainer's own
  examples from its counterexamples (`separate`: words added greedily, most useful first, while the
  balanced accuracy on those examples rises), as `the word "red"` or `the words "red", "blue"`; without
  counterexamples, the fewest marked words that examples weighing at least `agree` mark (`cover`). The
  judge says yes where the context holds one of those words (detection) or where every marked token is
  one (fuzzing). It is what a word-level explainer can at best say, needs no ground truth, and works for
  any tokenizer and any world; a shapes organism cannot read free text, so this is the organism-side
  protocol. Why counterexamples: a word feature of an SAE also fires weakly on other words, and the
  low quantile bands (half the held-out positives) show those; `cover` stopped at the strong word and
  scored 0.79-0.83 detection on word-matched features at the subject's layers 0, 2 and 4 where
  `separate` scored 0.80-0.95 (README, "Image and text tokens together").
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from explain.backends import Backend, ChatRequest
from explain.examples import Picked
from explain.prompts import CANNOT_TELL, GarbageAnswer, one_line

TEXT_PROTOCOLS = ("tokens", "generic")
L, R = "<<", ">>"

SYSTEM = (
    "You study features of a language model. You are given short texts; in each, the tokens where one feature is "
    "active are marked like <<this>> (consecutive active tokens share one pair of marks). After some texts, a line "
    "lists the marked tokens with their activation from 0 to 10. Texts under 'Counterexamples' are ones where the "
    "feature is not active at all. Find what the marked tokens have in common. Be concise: a few words, no list of "
    "alternatives, do not mention the marks. End your answer with one line: [EXPLANATION]: <your explanation>. If "
    "nothing is common to them, write [EXPLANATION]: cannot tell"
)
DETECTION_PROMPT = (
    'A feature of a language model is described as: "{explanation}". Here is a text:\n{text}\n'
    "Is the feature active somewhere in this text? Answer yes or no."
)
FUZZING_PROMPT = (
    'A feature of a language model is described as: "{explanation}". In the text below, some tokens are marked '
    "like <<this>>:\n{text}\nDo all the marked tokens fit the description? Answer yes or no."
)
_EXPLANATION = re.compile(r"\[EXPLANATION\]\s*:\s*(.*)", re.I | re.S)


@dataclass
class TextExample:
    """One sample's text tokens with the feature's activation on each."""

    sample: int  # row of the cache's samples table
    source: str  # "top", "q0".., "negative"
    tokens: list[str]  # the decoded tokens, spacing included: "".join(tokens) is the text
    acts: np.ndarray  # the feature's activation per token
    vmax: float  # the feature's max over the cache's text rows (activations 0..10 are relative to it)

    @property
    def value(self) -> float:
        return float(self.acts.max()) if len(self.acts) else 0.0

    @property
    def text(self) -> str:
        return "".join(self.tokens).strip()


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token's piece of the decoded text, its spacing included (so "".join gives the text as the
    tokenizer decodes it, for word-level and BPE tokenizers alike)."""
    out, before = [], ""
    for i in range(len(ids)):
        now = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(now[len(before):] if now.startswith(before) else tokenizer.decode([ids[i]]))
        before = now
    return out


def window(n: int, peak: int, size: int) -> slice:
    """`size` positions of `n` around `peak`, the peak three quarters of the way in (as delphi's contexts)."""
    if n <= size:
        return slice(0, n)
    start = min(max(peak - (size - size // 4), 0), n - size)
    return slice(start, start + size)


def load_contexts(sources, feature: int, picked: list[Picked], tokenizer, max_tokens: int = 64) -> list[TextExample]:
    """The text contexts of the samples behind `picked` with the feature's activation per token (re-encoded),
    cut to `max_tokens` around the strongest token."""
    vmax = sources.features.stats(feature).max_text
    out = []
    for p in picked:
        tokens, acts = sources.token_activations(feature, p.example.sample, modality="text")
        if not len(tokens):
            continue
        cut = window(len(tokens), int(np.argmax(acts)), max_tokens)
        out.append(TextExample(p.example.sample, p.source, token_strings(tokenizer, tokens["token_id"][cut].tolist()),
                               np.asarray(acts[cut], np.float32), vmax))
    return out


def highlight(tokens: list[str], marked: np.ndarray) -> str:
    """The text with each run of marked tokens inside one pair of << >> (leading spaces stay outside)."""
    out, i = [], 0
    while i < len(tokens):
        if not marked[i]:
            out.append(tokens[i])
            i += 1
            continue
        j = i
        while j < len(tokens) and marked[j]:
            j += 1
        run = "".join(tokens[i:j])
        lead = run[: len(run) - len(run.lstrip())]
        out.append(f"{lead}{L}{run.strip()}{R}")
        i = j
    return "".join(out).strip()


def active(ex: TextExample, threshold: float) -> np.ndarray:
    """The tokens above `threshold` of the example's own max (delphi marks relative to each example)."""
    return (ex.acts > threshold * ex.value) & (ex.acts > 0)


def activation_line(ex: TextExample, marked: np.ndarray, most: int = 10) -> str:
    pairs = [f'("{ex.tokens[i].strip()}", {int(np.ceil(10 * ex.acts[i] / (ex.vmax or 1.0)).clip(0, 10))})'
             for i in np.flatnonzero(marked)[:most]]
    return "Activations: " + ", ".join(pairs)


def fuzzed_marks(ex: TextExample, n_marks: int, seed: int) -> np.ndarray:
    """`n_marks` marks on random tokens of a non-activating context (the same ones for a seed and sample)."""
    rng = np.random.default_rng([seed, ex.sample])
    marks = np.zeros(len(ex.tokens), bool)
    real = [i for i, t in enumerate(ex.tokens) if t.strip()]
    marks[rng.choice(real, size=min(n_marks, len(real)), replace=False)] = True
    return marks


def parse_explanation(text: str) -> str:
    """The `[EXPLANATION]:` line of a reply (delphi's format), else its first line; CANNOT_TELL as such."""
    m = _EXPLANATION.search(text or "")
    return one_line(m.group(1) if m else text)


# ---------------------------------------------------------------- protocols


@dataclass
class TextExplanation:
    text: str
    raw: str
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0


class GenericTextExplainer:
    """Any instruction-following LMM behind a Backend (HTTP or local)."""

    def __init__(self, backend: Backend, threshold: float = 0.3, show_activations: bool = True,
                 max_tokens: int = 96, seed: int = 0):
        self.backend, self.threshold, self.show_activations = backend, threshold, show_activations
        self.max_tokens, self.seed = max_tokens, seed
        self.name = f"text-generic:{backend.name}"
        self.tokens_in = self.tokens_out = 0

    def request(self, examples: list[TextExample], negatives: list[TextExample] = ()) -> ChatRequest:
        lines = []
        for i, ex in enumerate(examples, 1):
            marked = active(ex, self.threshold)
            lines.append(f"Example {i}: {highlight(ex.tokens, marked)}")
            if self.show_activations:
                lines.append(activation_line(ex, marked))
        if negatives:
            lines.append("\nCounterexamples:")
            lines += [f"Counterexample {i}: {ex.text}" for i, ex in enumerate(negatives, 1)]
        return ChatRequest(["\n".join(lines)], max_tokens=self.max_tokens, system=SYSTEM)

    def explain(self, examples: list[TextExample], negatives: list[TextExample] = ()) -> TextExplanation:
        if not examples:
            raise ValueError("no text examples to explain")
        t0 = time.time()
        (reply,) = self.backend.complete([self.request(examples, negatives)])
        return TextExplanation(parse_explanation(reply.text), reply.text, reply.tokens_in, reply.tokens_out,
                               time.time() - t0)

    def _ask(self, prompts: list[str]) -> list[float | None]:
        from explain.explainers import _score

        replies = self.backend.complete([ChatRequest([p], max_tokens=3, yes_no=True) for p in prompts])
        self.tokens_in += sum(r.tokens_in for r in replies)
        self.tokens_out += sum(r.tokens_out for r in replies)
        return [_score([r]) for r in replies]

    def detect(self, explanation: str, contexts: list[TextExample]) -> list[float | None]:
        if explanation == CANNOT_TELL:
            return [0.0] * len(contexts)
        return self._ask([DETECTION_PROMPT.format(explanation=explanation, text=ex.text) for ex in contexts])

    def fuzz(self, explanation: str, contexts: list[tuple[TextExample, np.ndarray]]) -> list[float | None]:
        if explanation == CANNOT_TELL:
            return [0.0] * len(contexts)
        return self._ask([FUZZING_PROMPT.format(explanation=explanation, text=highlight(ex.tokens, m))
                          for ex, m in contexts])


def _word(token: str) -> str:
    return token.strip().lower()


def explanation_words(text: str) -> list[str]:
    """The quoted words of a `tokens` explanation (`the words "red", "blue"`)."""
    return re.findall(r'"([^"]+)"', text)


def cover(marked: list[list[str]], weights: np.ndarray, agree: float, max_words: int) -> list[str]:
    """The fewest marked words (greedily, at most `max_words`) such that examples weighing at least `agree`
    mark one of them: one word for a word feature, the category's words for a feature of a category
    ("red", "blue", ... for any colour word); [] when no such set exists."""
    chosen: list[str] = []
    covered = np.zeros(len(marked), bool)
    while covered @ weights < agree - 1e-9 and len(chosen) < max_words:
        gain = Counter()
        for words, w, done in zip(marked, weights, covered):
            if not done:
                for word in words:
                    gain[word] += w
        if not gain:
            break
        best = max(gain, key=lambda word: (gain[word], word))
        chosen.append(best)
        covered |= np.array([best in words for words in marked])
    return chosen if covered @ weights >= agree - 1e-9 else []


def separate(marked: list[list[str]], seen: list[set[str]], negatives: list[set[str]], max_words: int) -> list[str]:
    """Marked words, added greedily (the most useful first, at most `max_words`) while the balanced accuracy
    of "the context holds one of them" over the examples (`marked`: each example's marked words; `seen`: all
    its words) and the counterexamples (`negatives`: each one's words) rises; [] when no word helps.
    A candidate is marked in at least two examples and in at least half of those that hold it: a word the
    feature passes over where it appears, or marks once, is its weak firing, not what it detects."""
    def balanced(words: set[str]) -> float:
        hit = np.mean([bool(words.intersection(m)) for m in marked])
        return (hit + np.mean([not (words & n) for n in negatives])) / 2

    times_marked = Counter(w for m in marked for w in set(m))
    times_seen = Counter(w for words in seen for w in words)
    candidates = sorted(w for w, n in times_marked.items() if n >= 2 and n >= times_seen[w] / 2)
    chosen: list[str] = []
    best = 0.5  # the empty set: no example covered, every counterexample clear
    while len(chosen) < max_words:
        scored = [(balanced(set(chosen) | {w}), w) for w in candidates if w not in chosen]
        if not scored:
            break
        value, word = max(scored, key=lambda x: (x[0], x[1]))
        if value <= best + 1e-9:
            break
        best = value
        chosen.append(word)
    return chosen


class TokenExplainer:
    """The model-free protocol: the marked words that tell the examples from the counterexamples, and a literal
    judge."""

    def __init__(self, threshold: float = 0.3, agree: float = 0.5, max_words: int = 8):
        if not 0 < agree <= 1:
            raise ValueError(f"agree must be in (0, 1], got {agree}")
        self.threshold, self.agree, self.max_words = threshold, agree, max_words
        self.name = "text-tokens"
        self.tokens_in = self.tokens_out = 0

    def explain(self, examples: list[TextExample], negatives: list[TextExample] = ()) -> TextExplanation:
        if not examples:
            raise ValueError("no text examples to explain")
        t0 = time.time()
        marked_words = [sorted({_word(ex.tokens[i]) for i in np.flatnonzero(active(ex, self.threshold))} - {""})
                        for ex in examples]
        if negatives:
            keep = separate(marked_words, [{_word(t) for t in ex.tokens} - {""} for ex in examples],
                            [{_word(t) for t in ex.tokens} - {""} for ex in negatives], self.max_words)
        else:  # no counterexamples: weigh the examples by their activation
            weights = np.array([max(ex.value / (ex.vmax or 1.0), 0.0) for ex in examples]) + 1e-12
            keep = cover(marked_words, weights / weights.sum(), self.agree, self.max_words)
        if not keep:
            text = CANNOT_TELL
        else:
            text = ("the word " if len(keep) == 1 else "the words ") + ", ".join(f'"{w}"' for w in keep)
        import json

        return TextExplanation(text, json.dumps(marked_words), seconds=time.time() - t0)

    def detect(self, explanation: str, contexts: list[TextExample]) -> list[float]:
        words = set(explanation_words(explanation))
        return [float(bool(words & {_word(t) for t in ex.tokens})) for ex in contexts]

    def fuzz(self, explanation: str, contexts: list[tuple[TextExample, np.ndarray]]) -> list[float]:
        words = set(explanation_words(explanation))
        return [float(bool(m.any()) and all(_word(ex.tokens[i]) in words for i in np.flatnonzero(m)))
                for ex, m in contexts]


def make_text_explainer(spec: str, protocol: str, opts, cache=None) -> GenericTextExplainer | TokenExplainer:
    """The text explainer: `tokens` needs no model; `generic` asks `spec` (an OpenAI-compatible URL or a
    local model) with the HTTP settings of `opts` (explain.explainers.ExplainerOptions)."""
    from explain.backends import HFBackend, HTTPConfig, OpenAIBackend, api_key_from_env
    from explain.explainers import is_http

    if protocol not in TEXT_PROTOCOLS:
        raise ValueError(f"text explanations use one of the protocols {', '.join(TEXT_PROTOCOLS)}, not {protocol!r}")
    if protocol == "tokens":
        return TokenExplainer(threshold=opts.threshold or 0.3, agree=opts.agree)
    if is_http(spec):
        backend = OpenAIBackend(HTTPConfig(spec, opts.api_model, api_key_from_env(opts.api_key_env), opts.timeout,
                                           opts.retries, opts.backoff, opts.concurrency, opts.logprobs, cache=cache))
    else:
        backend = HFBackend(spec, device=opts.device, dtype=opts.dtype)
    return GenericTextExplainer(backend, threshold=opts.threshold or 0.3)


# ---------------------------------------------------------------- scoring one feature


def score_text_feature(judge, explanation: str, positives: list[TextExample], negatives: list[TextExample],
                       words: list[str], threshold: float = 0.3, seed: int = 0) -> dict:
    """Detection and fuzzing of one text feature's explanation on held-out contexts, and whether it names
    the word(s) the feature matches (None when it matches none), as one JSON-able record."""
    from dataclasses import asdict

    from explain.scoring import _no_nan, detection_metrics

    t0 = time.time()
    before = (judge.tokens_in, judge.tokens_out)
    labels = [True] * len(positives) + [False] * len(negatives)
    sources = [ex.source for ex in positives + negatives]
    det_v = judge.detect(explanation, positives + negatives)
    marks = [active(ex, threshold) for ex in positives]
    n_marks = max(1, int(np.ceil(np.mean([m.sum() for m in marks])))) if marks else 1
    fuzz_ctx = list(zip(positives, marks)) + [(ex, fuzzed_marks(ex, n_marks, seed)) for ex in negatives]
    fuzz_v = judge.fuzz(explanation, fuzz_ctx)
    rnd = [None if v is None else round(float(v), 4) for v in det_v]
    return {"explanation": explanation,
            "detection": _no_nan(asdict(detection_metrics(det_v, labels, sources))),
            "fuzzing": _no_nan(asdict(detection_metrics(fuzz_v, labels, sources))),
            "verdicts": rnd, "fuzz_verdicts": [None if v is None else round(float(v), 4) for v in fuzz_v],
            "samples": [ex.sample for ex in positives + negatives], "words": words,
            "names_word": names_word(explanation, words) if words else None,
            "tokens_in": judge.tokens_in - before[0], "tokens_out": judge.tokens_out - before[1],
            "seconds": round(time.time() - t0, 3)}


def names_word(explanation: str, words: list[str]) -> bool:
    """Whether the explanation names one of the words (as a whole word, case-insensitive; plurals count)."""
    found = set(re.findall(r"[a-z0-9]+", explanation.lower()))
    found |= {w[:-2] if w.endswith("es") else w[:-1] for w in found if w.endswith("s")}
    return any(w.lower() in found for w in words)


def summarize_text(records: dict[int, dict], matched: dict[int, list[tuple[str, float]]],
                   targets: tuple[float, float] = (0.9, 0.85)) -> dict:
    """Means over all scored text features, and the issue's numbers over the word-matched ones."""
    def mean(values):
        vals = [v for v in values if v is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    def block(recs: list[dict]) -> dict:
        return {"n": len(recs), "detection_balanced_accuracy": mean(r["detection"]["balanced_accuracy"] for r in recs),
                "fuzzing_balanced_accuracy": mean(r["fuzzing"]["balanced_accuracy"] for r in recs),
                "detection_auroc": mean(r["detection"]["auroc"] for r in recs),
                "tokens_in": int(sum(r.get("tokens_in", 0) for r in recs)),
                "tokens_out": int(sum(r.get("tokens_out", 0) for r in recs))}

    on_word = {f: r for f, r in records.items() if f in matched}
    named = [bool(r["names_word"]) for r in on_word.values()]
    out = {"all": block(list(records.values())), "matched": block(list(on_word.values()))}
    out["matched"].update(
        text_explanation_accuracy=round(float(np.mean(named)), 4) if named else None,
        features={str(f): {"words": [w for w, _ in matched[f]], "explanation": r["explanation"],
                           "names_word": r["names_word"],
                           "detection_balanced_accuracy": r["detection"]["balanced_accuracy"],
                           "fuzzing_balanced_accuracy": r["fuzzing"]["balanced_accuracy"]}
                  for f, r in sorted(on_word.items())},
        not_scored=sorted(set(matched) - set(on_word)))
    acc = out["matched"]["text_explanation_accuracy"]
    bal = out["matched"]["detection_balanced_accuracy"]
    out["targets"] = {"text_explanation_accuracy>=": targets[0], "detection_balanced_accuracy>=": targets[1],
                      "text_explanation_accuracy_met": acc is not None and acc >= targets[0],
                      "detection_balanced_accuracy_met": bal is not None and bal >= targets[1]}
    return out


__all__ = ["GenericTextExplainer", "TextExample", "TokenExplainer", "GarbageAnswer", "highlight", "load_contexts",
           "make_text_explainer", "score_text_feature", "summarize_text"]
