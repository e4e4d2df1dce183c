"""Explainers: one interface over the shapes organisms, local HF VLMs and OpenAI-compatible servers.

    explainer = make_explainer("shapes-explainer")
    explanation = explainer.explain(marked_examples, negatives)  # Explanation(text, raw, tokens, seconds)
    descriptions = explainer.describe(regions)                   # world protocol: what each region shows
    scores = explainer.judge(explanation, images)                 # P(image shows it), or yes/no

An explainer is a protocol (what to ask: `WorldExplainer` for the shapes organisms, which speak
only the world's grammar; `GenericExplainer` for instruction-following VLMs) over a backend
(how to ask: `HFBackend` for a local model, `OpenAIBackend` for a server). Any protocol runs
over any backend, so the shapes explainer served by `transformers serve` or `interp
serve-explainer` is explained with exactly the questions it answers locally.

The world protocol asks a describer what each highlighted region shows: `ModelDescriber` asks the
explainer model ("what is in the highlighted region ?" on the image dimmed outside the region, as
it was trained; "describe the image ." for captions), `OracleDescriber` answers from the world's
ground truth (`describe_region`, `caption`), so scoring with the oracle tells the explainer's
perception errors from the explanation's own (`make_explainer("oracle")`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from explain import aggregate as agg
from explain.backends import Backend, ChatRequest, HFBackend, HTTPConfig, OpenAIBackend, Reply, api_key_from_env
from explain.examples import MarkedExample, Region, feature_region, silent_region
from explain.prompts import (CANNOT_TELL, CAPTION_QUESTION, CAPTION_TOKENS, EXPLAIN_PROMPT, JUDGE_PROMPT,
                             ORIGINALS_NOTE, REGION_QUESTION, REGION_TOKENS, GarbageAnswer, one_line, yes_no)
from explain.render import render_feature
from interp.infra.cli_config import choices
from interp.shapes.world import WorldConfig, dim_outside_patches

PROTOCOLS = ("auto", "world", "generic")
ORACLE = "oracle"  # the explainer spec of the ground-truth describer


@dataclass
class Explanation:
    text: str  # one line; CANNOT_TELL when the explainer found nothing consistent
    raw: str  # what the model said (the world protocol: its per-region answers, as JSON)
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0


class Explainer(Protocol):
    name: str  # protocol and model, recorded with every explanation

    def explain(self, examples: list[MarkedExample], negatives: list[MarkedExample] = ()) -> Explanation: ...

    def judge(self, explanation: Explanation | str, images: list[Image.Image]) -> list[bool | float | None]:
        """Per image: P(it shows the explanation) where the model gives one, else yes/no; None if unreadable."""
        ...


@dataclass
class Usage:
    """Tokens a model spent (read by the scorer around each feature's calls)."""

    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, replies: list[Reply]) -> None:
        self.tokens_in += sum(r.tokens_in for r in replies if not r.cached)
        self.tokens_out += sum(r.tokens_out for r in replies if not r.cached)


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


# ---------------------------------------------------------------- describers (the world protocol)


class Describer(Protocol):
    name: str
    usage: Usage

    def describe(self, regions: list[Region]) -> list[str]: ...

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]: ...


class ModelDescriber:
    """A shapes explainer model asked the questions it was trained on, batched; answers are kept per
    (image, region) and per image, so what several features share is asked once."""

    def __init__(self, backend: Backend, world: WorldConfig = WorldConfig(), keep: float = 0.25):
        self.backend, self.world, self.keep = backend, world, keep
        self.name = backend.name
        self.usage = Usage()
        self._regions: dict[tuple[str, bytes], str] = {}
        self._captions: dict[str, str] = {}

    def view(self, region: Region) -> Image.Image:
        """The image dimmed outside the region's patches, as the explainer's training views."""
        img = np.asarray(region.image.convert("RGB"))
        return Image.fromarray(dim_outside_patches(img, region.mask, self.world.patch, self.keep))

    def _ask(self, memo: dict, keys: list, requests: dict) -> list[str]:
        todo = [k for k in dict.fromkeys(keys) if k not in memo]
        if todo:
            replies = self.backend.complete([requests[k]() for k in todo])
            self.usage.add(replies)
            for k, r in zip(todo, replies):
                memo[k] = r.text
        return [memo[k] for k in keys]

    def describe(self, regions: list[Region]) -> list[str]:
        by_key = {r.key: r for r in regions}
        return self._ask(self._regions, [r.key for r in regions],
                         {k: (lambda r=r: ChatRequest([self.view(r), REGION_QUESTION], max_tokens=REGION_TOKENS))
                          for k, r in by_key.items()})

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        by_ref = dict(images)
        return self._ask(self._captions, [ref for ref, _ in images],
                         {ref: (lambda im=im: ChatRequest([im, CAPTION_QUESTION], max_tokens=CAPTION_TOKENS))
                          for ref, im in by_ref.items()})


class OracleDescriber:
    """The world's ground truth in the explainer's grammar: `describe_region` and `caption` of each
    scene, regenerated from its image reference (shapes-world images only)."""

    name = ORACLE

    def __init__(self, world: WorldConfig = WorldConfig()):
        if world != WorldConfig():
            raise ValueError("the oracle describes the default world's scenes (the ones image references name)")
        self.world = world
        self.usage = Usage()  # costs no tokens

    def scene(self, ref: str):
        from explain.examples import shapes_scene

        scene = shapes_scene(ref)
        if scene is None:
            raise ValueError(f"the oracle describes shapes-world images only (shapes:SPLIT:INDEX:SEED), not {ref!r}")
        return scene

    def describe(self, regions: list[Region]) -> list[str]:
        from interp.shapes.world import describe_region

        return [describe_region(self.scene(r.image_ref), r.mask) for r in regions]

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        from interp.shapes.world import caption

        return [caption(self.scene(ref)) for ref, _ in images]


def _seed(examples: list[MarkedExample], seed: int) -> np.random.Generator:
    """A generator fixed by the examples (so the same feature always gets the same silent regions)."""
    return np.random.default_rng([seed, len(examples), *[int(e.sample) for e in examples[:16]]])


def silent_regions(positives: list[Region], examples: list[MarkedExample], negatives: list[MarkedExample],
                   world: WorldConfig, rng: np.random.Generator, silent: float = 0.0) -> list[Region]:
    """One region where the feature is silent per region in `positives`, of its size: from the images
    where the feature never fires and from the silent patches of the activating images, in turn, every
    other one a near miss (where its pre-activation came closest to firing, when the examples have them)."""
    pool: list[tuple[MarkedExample, str]] = []
    for i in range(max(len(negatives), len(examples))):
        pool += [(negatives[i], "negative")] if i < len(negatives) else []
        pool += [(examples[i], "silent")] if i < len(examples) else []
    out: list[Region] = []
    if not pool:
        return out
    at = 0
    for j, pos in enumerate(positives):
        for _ in range(len(pool)):
            ex, source = pool[at % len(pool)]
            at += 1
            region = silent_region(ex, pos.size, world, rng, silent, source, near=j % 2 == 1)
            if region is not None:
                out.append(region)
                break
    return out


@dataclass(eq=False)
class _Plan:
    """One feature's regions while its explanation is being made (explain_many)."""

    examples: list[MarkedExample]
    negatives: list[MarkedExample]
    regions: list[Region] = field(default_factory=list)
    silent: list[Region] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    silent_descriptions: list[str] = field(default_factory=list)
    captions: list[str] | None = None
    negative_captions: list[str] | None = None
    result: agg.Explanation | None = None
    error: Exception | None = None


class WorldExplainer:
    """The shapes organisms' protocol: each example's region where the feature fires described on its
    own, with regions of the same size where it is silent as the contrast, aggregated into the
    attributes most examples share (explain.aggregate); captions for context where the region alone
    names no object. `judge` asks the world's "is there PHRASE ?" about whole images."""

    def __init__(self, backend: Backend | Describer, agree: float = 0.6, weighted: bool = True,
                 cutoff: float = 0.5, patches: int | None = 1, candidates: float = 0.5, tolerance: float = 0.02,
                 context_margin: float = 0.35, min_negatives: int = 5, silent: float = 0.0,
                 world: WorldConfig = WorldConfig(), seed: int = 0, contrast: bool = True):
        """`contrast`: describe silent regions of the same size and keep only the attributes that tell the
        feature's regions from them (the protocol's default); False: no silent regions, the attributes most
        regions share (explain.aggregate without `silent`), the ablation explain.methods compares."""
        if not 0 < agree <= 1:
            raise ValueError(f"agree must be in (0, 1], got {agree}")
        if not 0 <= cutoff <= 1:
            raise ValueError(f"cutoff must be in [0, 1], got {cutoff}")
        self.describer: Describer = backend if hasattr(backend, "describe") else ModelDescriber(backend, world)
        self.backend = getattr(self.describer, "backend", None)
        self.agree, self.weighted, self.cutoff, self.patches = agree, weighted, cutoff, patches
        self.candidates, self.tolerance = candidates, tolerance
        self.context_margin, self.min_negatives, self.silent = context_margin, min_negatives, silent
        self.world, self.seed, self.contrast = world, seed, contrast
        self.name = f"world:{self.describer.name}"

    @property
    def usage(self) -> Usage:
        return self.describer.usage

    def regions(self, examples: list[MarkedExample]) -> list[Region]:
        """Per example, the region where the feature fires (examples where it does not are left out)."""
        return [r for r in (feature_region(ex, self.world, self.cutoff, self.patches) for ex in examples)
                if r is not None]

    def describe(self, regions: list[Region]) -> list[str]:
        return self.describer.describe(regions) if regions else []

    def caption(self, items: list[MarkedExample | Region]) -> list[str]:
        images = [(x.image_ref, x.original if isinstance(x, MarkedExample) else x.image) for x in items]
        return self.describer.caption(images) if images else []

    def explain(self, examples: list[MarkedExample], negatives: list[MarkedExample] = ()) -> Explanation:
        (out,) = self.explain_many([(examples, list(negatives))])
        if isinstance(out, Exception):
            raise out
        return out

    def explain_many(self, items: list[tuple[list[MarkedExample], list[MarkedExample]]]) -> list:
        """Explanations of several features (each: its examples and its silent images), every model
        question of them asked in one batched call (and one for captions): an Explanation or the
        exception that stopped it, per feature."""
        t0 = time.time()
        before = (self.usage.tokens_in, self.usage.tokens_out)
        plans = [_Plan(list(ex), list(neg)) for ex, neg in items]
        for plan in plans:
            try:
                plan.regions = self.regions(plan.examples)
                if not plan.regions:
                    raise ValueError("no example has an active patch to highlight: nothing to explain")
                if self.contrast:
                    plan.silent = silent_regions(plan.regions, plan.examples, plan.negatives, self.world,
                                                 _seed(plan.examples, self.seed), self.silent)
            except Exception as e:  # noqa: BLE001  (recorded for that feature)
                plan.error = e
        live = [p for p in plans if p.error is None]
        try:
            answers = iter(self.describe([r for p in live for r in p.regions + p.silent]))
        except Exception as e:  # noqa: BLE001  (a backend that failed for good: every feature of the batch)
            for p in live:
                p.error = e
            live = []
        for p in live:
            p.descriptions = [next(answers) for _ in p.regions]
            p.silent_descriptions = [next(answers) for _ in p.silent]
            if not any(agg.attributes(d, self.world) for d in p.descriptions):
                p.error = GarbageAnswer(f"the explainer's region answers name nothing of the shapes world "
                                        f"({p.descriptions[:3]}): is it a shapes organism? Otherwise use "
                                        "--protocol generic")
                continue
            p.result = self._aggregate(p)
        wants = [p for p in live if p.error is None and self._wants_context(p)]
        if wants:
            try:
                caps = iter(self.caption([x for p in wants for x in p.examples + p.negatives]))
            except Exception as e:  # noqa: BLE001
                for p in wants:
                    p.error = e
                wants = []
            for p in wants:
                p.captions = [next(caps) for _ in p.examples]
                p.negative_captions = [next(caps) for _ in p.negatives]
                p.result = self._aggregate(p, p.captions, p.negative_captions)
        seconds = time.time() - t0
        t_in, t_out = self.usage.tokens_in - before[0], self.usage.tokens_out - before[1]
        out = []
        for p in plans:
            if p.error is not None:
                out.append(p.error)
                continue
            raw = {"regions": [{"sample": r.sample, "source": r.source, "weight": round(r.weight, 4),
                                "patches": r.size, "description": d} for r, d in zip(p.regions, p.descriptions)],
                   "silent": [{"sample": r.sample, "source": r.source, "description": d}
                              for r, d in zip(p.silent, p.silent_descriptions)]}
            if p.captions is not None:
                raw["captions"] = p.captions
                raw["negative_captions"] = p.negative_captions
            share = 1 / len(plans)  # the batch's tokens and time, split evenly
            out.append(Explanation(p.result.text(), json.dumps(raw), round(t_in * share), round(t_out * share),
                                   seconds * share))
        return out

    def _wants_context(self, p: _Plan) -> bool:
        """Context is looked for where the region names no object attribute and the feature has enough
        silent images to compare with (a feature that fires on nearly every image has no context)."""
        return agg.about_no_object(p.result) and len(p.negatives) >= self.min_negatives

    def _aggregate(self, p: _Plan, captions=None, negative_captions=None) -> agg.Explanation:
        weights = [r.weight for r in p.regions] if self.weighted else None
        if weights is not None and sum(weights) <= 0:
            weights = None
        return agg.aggregate(p.descriptions, weights, self.agree, captions, negative_captions, self.context_margin,
                             self.world, silent=p.silent_descriptions or None, candidates=self.candidates,
                             tolerance=self.tolerance)

    def judge(self, explanation: Explanation | str, images: list[Image.Image]) -> list[bool | float | None]:
        """Whole images: "is there PHRASE ?" (the explainer's judge task), P(yes) where the backend gives it."""
        if self.backend is None:
            raise ValueError(f"{self.name} judges regions only (explain.scoring), not whole images")
        e = agg.parse(_text(explanation), self.world)
        if not e.region:
            return [0.0] * len(images)
        question = f"is there {agg.phrase(e.region)} ?"
        replies = self.backend.complete([ChatRequest([im, question], max_tokens=2, yes_no=True) for im in images])
        self.usage.add(replies)
        return [_score([r]) for r in replies]


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

    def explain(self, examples: list[MarkedExample], negatives: list[MarkedExample] = ()) -> Explanation:
        """One prompt with every marked example (`negatives`: not shown in this protocol)."""
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
    """world: share of the (activation-weighted) examples an attribute must be named in"""
    cutoff: float = 0.5
    """world: an example's region holds the patches at or above this fraction of its own max"""
    threshold: float = 0.0
    """generic: tokens above this fraction of the feature's max are marked active"""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not 0 < self.agree <= 1:
            raise ValueError(f"--agree must be in (0, 1], got {self.agree}")
        if not 0 <= self.cutoff <= 1:
            raise ValueError(f"--cutoff must be in [0, 1], got {self.cutoff}")


def is_http(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def speaks_world(model: str) -> bool:
    """Whether a model is a shapes organism (a shipped name, or a directory trained on the world)."""
    from interp.shapes.organisms import is_organism

    if not model:
        return False
    if model == ORACLE or is_organism(model) or Path(model).name.startswith("shapes-"):
        return True
    meta = Path(model) / "training.json"
    return meta.exists() and "world" in json.loads(meta.read_text())


def weights_fingerprint(spec: str) -> str | None:
    """The first 16 hex digits of the sha256 of a local explainer's safetensors files: records made under
    the same name by other weights ("shapes-explainer" before an upgrade) are not done. None for the
    oracle, hub ids and servers, whose weights the run cannot see."""
    from interp.shapes.organisms import is_organism, organism_path

    if not spec or spec == ORACLE or is_http(spec):
        return None
    path = organism_path(spec) if is_organism(spec) else Path(spec)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    return _fingerprint(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def make_explainer(spec: str, cfg: ExplainerOptions = ExplainerOptions(),
                   cache: str | Path | None = None) -> WorldExplainer | GenericExplainer:
    """The explainer `spec` names (organism, model directory or hub id, an OpenAI-compatible URL, or
    "oracle": the world's ground truth in the explainer's grammar); `cache`: the JSONL file HTTP
    replies are kept in."""
    if spec == ORACLE:
        if cfg.protocol == "generic":
            raise ValueError("the oracle speaks the world protocol only: drop --protocol generic")
        return WorldExplainer(OracleDescriber(), agree=cfg.agree, cutoff=cfg.cutoff)
    if is_http(spec):
        backend: Backend = OpenAIBackend(HTTPConfig(spec, cfg.api_model, api_key_from_env(cfg.api_key_env),
                                                    cfg.timeout, cfg.retries, cfg.backoff, cfg.concurrency,
                                                    cfg.logprobs, cache=cache))
        world = speaks_world(cfg.api_model or "") if cfg.protocol == "auto" else cfg.protocol == "world"
    else:
        world = speaks_world(spec) if cfg.protocol == "auto" else cfg.protocol == "world"
        # the shapes organisms are tiny: 256 single-image questions per generate call (each decoding step's
        # fixed cost is shared by more rows: explaining and scoring 7% faster than 64 on 2 cores, for 0.5 GB
        # more memory); a general VLM gets 32 prompts
        backend = HFBackend(spec, device=cfg.device, dtype=cfg.dtype, batch_size=256 if world else 32)
    if world:
        return WorldExplainer(backend, agree=cfg.agree, cutoff=cfg.cutoff)
    return GenericExplainer(backend, with_originals=cfg.with_originals, threshold=cfg.threshold)


__all__ = ["CANNOT_TELL", "ORACLE", "Explainer", "ExplainerOptions", "Explanation", "GenericExplainer",
           "ModelDescriber", "OracleDescriber", "WorldExplainer", "make_explainer"]
