"""Explainers: one interface over the shapes organisms, local HF VLMs and OpenAI-compatible servers.

    explainer = make_explainer("shapes-explainer")
    explanation = explainer.explain(marked_examples)        # Explanation(text, raw, tokens, seconds)
    scores = explainer.judge(explanation, images)           # P(image shows it), or yes/no

An explainer is a protocol (what to ask: `WorldExplainer` for the shapes organisms, which speak
only the world's vocabulary; `GenericExplainer` for instruction-following VLMs) over a backend
(how to ask: `HFBackend` for a local model, `OpenAIBackend` for a server). Any protocol runs
over any backend, so the shapes explainer served by `transformers serve` or `interp
serve-explainer` is explained with exactly the questions it answers locally.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from explain.backends import Backend, ChatRequest, HFBackend, HTTPConfig, OpenAIBackend, Reply, api_key_from_env
from explain.examples import MarkedExample
from explain.prompts import (CANNOT_TELL, EXPLAIN_PROMPT, JUDGE_PROMPT, ORIGINALS_NOTE, REGION_QUESTION,
                             GarbageAnswer, aggregate_regions, judge_questions, one_line, world_terms, yes_no)
from explain.render import render_feature
from interp.infra.cli_config import choices
from interp.shapes.world import WorldConfig

PROTOCOLS = ("auto", "world", "generic")


@dataclass
class Explanation:
    text: str  # one line; CANNOT_TELL when the explainer found nothing consistent
    raw: str  # what the model said (the world protocol: its per-example answers, as JSON)
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0


class Explainer(Protocol):
    name: str  # protocol and model, recorded with every explanation

    def explain(self, examples: list[MarkedExample]) -> Explanation: ...

    def judge(self, explanation: Explanation | str, images: list[Image.Image]) -> list[bool | float | None]:
        """Per image: P(it shows the explanation) where the model gives one, else yes/no; None if unreadable."""
        ...


@dataclass
class Usage:
    """Tokens a judge spent (read by the scorer around each feature's judge calls)."""

    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, replies: list[Reply]) -> None:
        self.tokens_in += sum(r.tokens_in for r in replies)
        self.tokens_out += sum(r.tokens_out for r in replies)


def _text(explanation: Explanation | str) -> str:
    return explanation.text if isinstance(explanation, Explanation) else str(explanation)


def _score(replies: list[Reply]) -> float | bool | None:
    """One image's verdict from its answers: the best P(yes), else whether any answer is yes."""
    probs = [r.p_yes for r in replies if r.p_yes is not None]
    if probs:
        return max(probs)
    votes = [yes_no(r.text) for r in replies]
    if all(v is None for v in votes):
        return None
    return any(votes)


class WorldExplainer:
    """The shapes organisms' protocol: a region question per marked example, answers aggregated
    (explain.prompts.aggregate_regions); the judge asks "is there a {color} {shape} ?"."""

    def __init__(self, backend: Backend, agree: float = 0.6, weighted: bool = True, regions_per_example: int = 1,
                 threshold: float = 0.0, dim: float = 0.25, world: WorldConfig = WorldConfig()):
        if not 0 < agree <= 1:
            raise ValueError(f"agree must be in (0, 1], got {agree}")
        self.backend, self.agree, self.weighted, self.world = backend, agree, weighted, world
        self.regions_per_example, self.threshold, self.dim = regions_per_example, threshold, dim
        self.name = f"world:{backend.name}"
        self.usage = Usage()

    def views(self, ex: MarkedExample) -> list[tuple[Image.Image, float]]:
        """(marked view, activation / feature max) for the strongest active tokens, one view each (the
        organisms learnt one highlighted cell at a time), at the image's own size (as trained)."""
        order = np.argsort(-ex.acts, kind="stable")[: self.regions_per_example]
        keep = [i for i in order if ex.acts[i] > max(self.threshold * ex.vmax, 0.0)]
        return [(render_feature(ex.original, ex.tokens[i: i + 1], ex.acts[i: i + 1], vmax=ex.vmax, dim=self.dim,
                                display_size=max(ex.original.size)).masked, float(ex.acts[i]) / (ex.vmax or 1.0))
                for i in keep]

    def explain(self, examples: list[MarkedExample]) -> Explanation:
        t0 = time.time()
        views = [v for ex in examples for v in self.views(ex)]
        if not views:
            raise ValueError("no example has an active token to mark: nothing to explain")
        replies = self.backend.complete([ChatRequest([v, REGION_QUESTION], max_tokens=8) for v, _ in views])
        answers = [r.text for r in replies]
        parsed = [world_terms(a, self.world) for a in answers]
        if not any(t.words or t.nothing for t in parsed):
            raise GarbageAnswer(f"the explainer's region answers name nothing of the shapes world "
                                f"({answers[:3]}): is it a shapes organism? Otherwise use --protocol generic")
        weights = [w for _, w in views] if self.weighted else None
        terms = aggregate_regions(answers, self.agree, weights, self.world)
        return Explanation(terms.text(), json.dumps(answers), sum(r.tokens_in for r in replies),
                           sum(r.tokens_out for r in replies), time.time() - t0)

    def judge(self, explanation: Explanation | str, images: list[Image.Image]) -> list[bool | float | None]:
        questions = judge_questions(world_terms(_text(explanation), self.world), self.world)
        if not questions:  # cannot tell / nothing: it never says an image shows it (chance detection)
            return [0.0] * len(images)
        replies = self.backend.complete([ChatRequest([im, q], max_tokens=2, yes_no=True)
                                         for im in images for q in questions])
        self.usage.add(replies)
        n = len(questions)
        return [_score(replies[i * n: (i + 1) * n]) for i in range(len(images))]


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """At most `max_side` pixels on the longer side (large photos would cost thousands of tokens)."""
    if max(image.size) <= max_side:
        return image
    s = max_side / max(image.size)
    return image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.Resampling.LANCZOS)


class GenericExplainer:
    """Any instruction-following VLM: all marked examples in one prompt, a one-line answer; the judge
    answers yes or no per image."""

    def __init__(self, backend: Backend, with_originals: bool = False, threshold: float = 0.0, dim: float = 0.25,
                 display_size: int = 384, max_side: int = 768, max_tokens: int = 48):
        self.backend, self.with_originals, self.threshold, self.dim = backend, with_originals, threshold, dim
        self.display_size, self.max_side, self.max_tokens = display_size, max_side, max_tokens
        self.name = f"generic:{backend.name}"
        self.usage = Usage()

    def request(self, examples: list[MarkedExample]) -> ChatRequest:
        parts: list = []
        for i, ex in enumerate(examples, 1):
            view = render_feature(ex.original, ex.tokens, ex.acts, vmax=ex.vmax, threshold=self.threshold,
                                  dim=self.dim, display_size=self.display_size)
            parts.append(f"Example {i}:")
            if self.with_originals:
                parts.append(fit(view.original, self.max_side))
            parts.append(fit(view.masked, self.max_side))
        note = ORIGINALS_NOTE if self.with_originals else ""
        parts.append(EXPLAIN_PROMPT.format(n=len(examples), originals=note))
        return ChatRequest(parts, max_tokens=self.max_tokens)

    def explain(self, examples: list[MarkedExample]) -> Explanation:
        t0 = time.time()
        if not examples:
            raise ValueError("no examples to explain")
        (reply,) = self.backend.complete([self.request(examples)])
        return Explanation(one_line(reply.text), reply.text, reply.tokens_in, reply.tokens_out, time.time() - t0)

    def judge(self, explanation: Explanation | str, images: list[Image.Image]) -> list[bool | float | None]:
        text = _text(explanation)
        if text == CANNOT_TELL:
            return [0.0] * len(images)
        prompt = JUDGE_PROMPT.format(explanation=text)
        replies = self.backend.complete([ChatRequest([fit(im, self.max_side), prompt], max_tokens=3, yes_no=True)
                                         for im in images])
        self.usage.add(replies)
        return [_score([r]) for r in replies]


# ---------------------------------------------------------------- construction


@dataclass
class ExplainerOptions:
    """How an explainer (or judge) model is asked: protocol, HTTP settings, local device, aggregation."""

    protocol: str = field(default="auto", metadata=choices(list(PROTOCOLS)))
    """world: region questions in the shapes vocabulary; generic: one prompt with all examples; auto: decided
    from the model"""
    api_model: str | None = None
    """HTTP: served model name (none: the first of GET /v1/models)"""
    api_key_env: str | None = None
    """HTTP: environment variable holding the API key"""
    timeout: float = 60.0
    """HTTP: seconds per request"""
    retries: int = 3
    """HTTP: retries per request (exponential backoff)"""
    backoff: float = 1.0
    """HTTP: seconds before the first retry (doubles)"""
    concurrency: int = 4
    """HTTP: requests in flight"""
    logprobs: bool = False
    """HTTP: ask for first-token logprobs (judge confidence; vLLM, SGLang, OpenAI)"""
    device: str = "auto"
    """local models and the SAE: auto (cuda when present), cpu, cuda, cuda:N"""
    dtype: str = "float32"
    """local models: float32, bfloat16, float16"""
    with_originals: bool = False
    """generic: show each original next to its marked view"""
    agree: float = 0.6
    """world: share of the (activation-weighted) examples a word must be named in"""
    threshold: float = 0.0
    """tokens above this fraction of the feature's max are marked active"""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")


def is_http(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def speaks_world(model: str) -> bool:
    """Whether a model is a shapes organism (a shipped name, or a directory trained on the world)."""
    from interp.shapes.organisms import is_organism

    if not model:
        return False
    if is_organism(model) or Path(model).name.startswith("shapes-"):
        return True
    meta = Path(model) / "training.json"
    return meta.exists() and "world" in json.loads(meta.read_text())


def make_explainer(spec: str, cfg: ExplainerOptions = ExplainerOptions(),
                   cache: str | Path | None = None) -> WorldExplainer | GenericExplainer:
    """The explainer `spec` names (organism, model directory or hub id, or an OpenAI-compatible URL);
    `cache`: the JSONL file HTTP replies are kept in."""
    if is_http(spec):
        backend: Backend = OpenAIBackend(HTTPConfig(spec, cfg.api_model, api_key_from_env(cfg.api_key_env),
                                                    cfg.timeout, cfg.retries, cfg.backoff, cfg.concurrency,
                                                    cfg.logprobs, cache=cache))
        world = speaks_world(cfg.api_model or "") if cfg.protocol == "auto" else cfg.protocol == "world"
    else:
        world = speaks_world(spec) if cfg.protocol == "auto" else cfg.protocol == "world"
        backend = HFBackend(spec, device=cfg.device, dtype=cfg.dtype)
    if world:
        return WorldExplainer(backend, agree=cfg.agree, threshold=cfg.threshold)
    return GenericExplainer(backend, with_originals=cfg.with_originals, threshold=cfg.threshold)


__all__ = ["CANNOT_TELL", "Explainer", "ExplainerOptions", "Explanation", "GenericExplainer", "WorldExplainer",
           "make_explainer"]
