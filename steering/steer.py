"""Steered generation: a model, an SAE at its layer, prompts with images, and interventions.

`load_setup` loads and cross-checks the three inputs (the SAE must fit the model's layer;
a features file must belong to the SAE). `prepare` turns queries into one left-padded batch
plus the position masks interventions select from (built from the token table, so "image"
means exactly the image-patch tokens the cache and the SAE saw). `generate` runs greedy
decoding with a `FeatureEdit` at the layer, through nnsight (`tracer.all()` over the decode
loop) or a plain forward hook; both call the same edit, so they give the same tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from interp.infra.layout import RunLayout
from steering.interventions import (FeatureEdit, Intervention, InterventionError, check_interventions, resolve,
                                    sae_hook)

if TYPE_CHECKING:
    from PIL import Image

    from interp.model.layers import HookPoint
    from interp.model.models import LoadedModel
    from saes.sae import SAE

ENGINES = ("nnsight", "torch")
IMAGE_PREFIXES = ("shapes:", "file:", "hf:")


@dataclass
class SteerSetup:
    """A model with an SAE that fits one of its layers, and (optionally) the SAE's feature statistics."""

    lm: LoadedModel
    sae: SAE
    hook: HookPoint
    run: RunLayout  # the run directory the SAE (and its features.h5) come from
    max_acts: np.ndarray | None = None  # [d_sae] max activation per feature, from features.h5

    def resolve(self, interventions: Sequence[Intervention]) -> list[Intervention]:
        return resolve(interventions, self.sae.cfg.d_sae, self.max_acts)


def load_setup(run: str | Path | RunLayout, model: str | None = None, layer: int | str | None = None,
               device: str = "auto", interventions: Sequence[Intervention] = ()) -> SteerSetup:
    """Load the run's SAE, its model (default: the one it was trained on) and, when the run has
    features.h5, the max activations.

    `interventions` are checked against the SAE before the model loads, so bad ones fail fast."""
    from interp.model.models import load_model, resolve_device
    from saes.sae import SAE

    layout = RunLayout.of(run)
    device = str(resolve_device(device))
    sae = SAE.load(layout.sae, device=device).eval()
    check_interventions(interventions, sae.cfg.d_sae, layout.features.exists())
    name = model or sae.cfg.model_name
    if not name:
        raise InterventionError(f"the SAE at {layout.sae} does not record its model (no model_name in cfg.json): "
                                "pass --model")
    lm = load_model(name, device=device)
    return setup_for(lm, sae, layout, layer)


def setup_for(lm: LoadedModel, sae: SAE, run: str | Path | RunLayout, layer: int | str | None = None) -> SteerSetup:
    """A SteerSetup from an already loaded model and the run's SAE (checks as in `load_setup`)."""
    if lm.kind == "hooked-transformer":
        raise InterventionError("steering runs transformers models (their generate); TransformerLens models are not "
                                "supported")
    for p in sae.parameters():
        p.requires_grad_(False)
    hook = sae_hook(lm, sae, layer)
    layout = RunLayout.of(run)
    max_acts = None
    if layout.features.exists():
        from explain.feature_reader import FeatureReader

        with FeatureReader(layout.features) as stats:
            stats.check_matches(layout.sae)
            max_acts = stats.summary_table()["max"].astype(np.float64)
    return SteerSetup(lm, sae, hook, layout, max_acts)


# ---------------------------------------------------------------- prompts


def image_ref(arg: str) -> str:
    """A data reference (`shapes:SPLIT:INDEX:SEED`, `file:PATH`, `hf:...`) for a CLI image argument."""
    if arg.startswith(IMAGE_PREFIXES):
        return arg
    path = Path(arg).expanduser()
    if path.is_file():
        return f"file:{path.resolve()}"
    raise FileNotFoundError(f"no image {arg!r}: give a file path or a reference shapes:SPLIT:INDEX:SEED")


OBJECT_COVERAGE = 0.05  # an image patch is the object's when the object covers more of it (recovery's labels)


def question_region(image_ref: str, prompt: str, scene=None) -> np.ndarray | None:
    """[H, W] in [0, 1]: the silhouette of the object(s) a shapes-world question names ("what color is the
    circle ?": the circle; "what shape is the red object ?": the red one), None when the image is not a
    shapes-world image or the question names no object of it. `scene`: the image's scene, when at hand."""
    from interp.shapes.ground_truth import parse_shapes_ref, scene_of
    from interp.shapes.world import phrase_attributes

    if scene is None:
        if parse_shapes_ref(image_ref.split("#", 1)[0]) is None:
            return None
        scene = scene_of(image_ref.split("#", 1)[0])
    attrs = {k: v for k, v in phrase_attributes(prompt, scene.config).items()
             if k in ("color", "shape", "size", "fill", "cell")}
    if not attrs:
        return None
    named = [o for o in scene.objects
             if all((o.position if k == "cell" else getattr(o, k)) == v for k, v in attrs.items())]
    return np.clip(np.sum([o.silhouette for o in named], axis=0), 0, 1) if named else None


@dataclass
class Query:
    """One prompt, with its image (None for text-only models). `image_ref` names it in records; `region`
    ([H, W] in [0, 1], optional) is the object the prompt asks about, for positions "object" (`prepare`
    finds it itself for a shapes-world reference: `question_region`)."""

    prompt: str
    image: Image.Image | None = None
    image_ref: str = ""
    region: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def load(cls, prompt: str, image: str | None) -> Query:
        from interp.cache.data import load_image

        if image is None:
            return cls(prompt)
        ref = image_ref(image)
        return cls(prompt, load_image(ref), ref, question_region(ref, prompt))


@dataclass
class PromptBatch:
    """Model inputs for queries (left padded) and the [B, T] masks of POSITIONS' prompt kinds."""

    queries: list[Query]
    inputs: dict
    masks: dict[str, torch.Tensor]
    table: np.ndarray = field(repr=False)  # token table (interp.cache.format.TOKEN_DTYPE), sample-major

    @property
    def length(self) -> int:
        return int(self.masks["all"].shape[1])

    def tokens(self, tokenizer, sample: int) -> list[str]:
        ids = self.inputs["input_ids"][sample].tolist()
        return tokenizer.convert_ids_to_tokens(ids)


def prepare(lm: LoadedModel, queries: Sequence[Query]) -> PromptBatch:
    """Tokenise queries the way every stage does (interp.model.inputs) and mark their image/text tokens."""
    from interp.cache.data import Sample
    from interp.model.inputs import model_inputs, prompts
    from interp.cache.format import is_image_patch, is_pad, is_user_text
    from interp.model.token_map import token_table

    queries = list(queries)
    has_image = [q.image is not None for q in queries]
    if lm.is_multimodal and not all(has_image):
        raise InterventionError(f"{lm.name} reads images: every prompt needs one (give --image)")
    if not lm.is_multimodal and any(has_image):
        raise InterventionError(f"{lm.name} reads text only: drop the image")
    samples = [Sample(i, q.image_ref, q.image, text=q.prompt) for i, q in enumerate(queries)]
    template = "{image}{text}" if lm.is_multimodal else "{text}"
    texts, users = prompts(lm, samples, template)
    inputs = model_inputs(lm, samples, texts)
    table = token_table(lm, inputs, [[s.image] for s in samples] if lm.is_multimodal else None, users)
    shape = tuple(inputs["input_ids"].shape)
    roles = torch.from_numpy(table["role"].reshape(shape).astype(np.int64))
    masks = {"image": is_image_patch(roles), "text": is_user_text(roles), "all": ~is_pad(roles)}
    regions = [q.region if q.region is not None or not q.image_ref.startswith("shapes:")
               else question_region(q.image_ref, q.prompt) for q in queries]
    if regions and all(r is not None for r in regions):
        masks["object"] = masks["image"] & torch.from_numpy(_region_rows(table, regions).reshape(shape))
    return PromptBatch(queries, inputs, masks, table)


def _region_rows(table: np.ndarray, regions: Sequence[np.ndarray]) -> np.ndarray:
    """[rows] bool: image rows whose pixel box their sample's region covers by more than OBJECT_COVERAGE."""
    out = np.zeros(len(table), bool)
    for i in np.flatnonzero(table["x1"] > table["x0"]):
        region = regions[int(table["sample"][i])]
        x0, y0 = max(int(np.floor(table["x0"][i])), 0), max(int(np.floor(table["y0"][i])), 0)
        x1, y1 = int(np.ceil(table["x1"][i])), int(np.ceil(table["y1"][i]))
        box = region[y0:y1, x0:x1]
        out[i] = box.size > 0 and float(box.mean()) > OBJECT_COVERAGE
    return out


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    texts: list[str]  # decoded answers, special tokens dropped, stripped
    tokens: list[list[int]]  # new token ids per sample, through the first EOS
    first_logits: torch.Tensor  # [B, V] float32 logits of the first generated token (before any processor)
    sequences: torch.Tensor  # [B, T + new] prompt and generated ids as generate returned them


def generate(setup: SteerSetup, batch: PromptBatch, interventions: Sequence[Intervention] = (), *,
             max_new_tokens: int = 8, engine: str = "nnsight", keep_error: bool = True,
             splice: bool = False) -> Generation:
    """Greedy generation with the (already resolved) interventions applied at the SAE's layer (`splice`: the
    model runs on the SAE's reconstruction there, see FeatureEdit)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    lm = setup.lm
    tok = lm.tokenizer
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                  else tok.eos_token_id)
    edit = FeatureEdit(setup.sae, interventions, batch.masks, keep_error, splice) if interventions else None
    with torch.no_grad():
        if edit is None:
            out = lm.model.generate(**batch.inputs, **kwargs)
        elif engine == "torch":
            out = _generate_hooked(lm, setup.hook.module_path, edit, batch.inputs, kwargs)
        else:
            out = _generate_nnsight(lm, setup.hook.module_path, edit, batch.inputs, kwargs)
    return _decode(lm, batch, out)


def _generate_hooked(lm, module_path: str, edit: FeatureEdit, inputs: dict, kwargs: dict):
    from interp.model.hooks import patch_output

    steps = iter(range(1 << 30))
    with patch_output(lm.model, module_path, lambda o: edit(o, next(steps))):
        return lm.model.generate(**inputs, **kwargs)


def _generate_nnsight(lm, module_path: str, edit: FeatureEdit, inputs: dict, kwargs: dict):
    from interp.model.hooks import nnsight_model

    wrapped = nnsight_model(lm.model)
    box = {}

    def run(**kw):  # generate's result, kept outside the trace: an open `tracer.all()` loop never returns
        box["out"] = lm.model.generate(**kw)
        return box["out"]

    with warnings.catch_warnings():  # "never reached": the open loop waits for one step past the last, by design
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with wrapped.trace(fn=run, **inputs, **kwargs) as tracer:
            for step in tracer.all():
                layer = wrapped.get(module_path)
                layer.output = edit(layer.output, step)
    return box["out"]


def _decode(lm, batch: PromptBatch, out) -> Generation:
    tok = lm.tokenizer
    new = out.sequences[:, batch.length:].cpu()
    eos = set(_eos_ids(lm))
    tokens = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        tokens.append(row if cut is None else row[: cut + 1])
    texts = [t.strip() for t in tok.batch_decode([[t for t in ids if t not in eos] for ids in tokens],
                                                 skip_special_tokens=True)]
    return Generation(texts, tokens, out.logits[0].float().cpu(), out.sequences.cpu())


def _eos_ids(lm) -> list[int]:
    eos = lm.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return [int(e) for e in eos if e is not None] or [int(lm.tokenizer.eos_token_id)]


@torch.no_grad()
def next_token_logits(setup: SteerSetup, batch: PromptBatch) -> torch.Tensor:
    """[B, V] float32 logits of the clean model for the token after each prompt (one forward)."""
    return setup.lm.model(**batch.inputs).logits[:, -1].float().cpu()


@torch.no_grad()
def placeholder_ids(lm) -> set[int]:
    """Token ids the model replaces with image (or video) features wherever they appear in its input."""
    config = getattr(lm.model, "config", None)
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return {int(v) for v in (getattr(config, n, None) for n in names) if isinstance(v, int)} if lm.is_multimodal else set()


def continuation_nll(setup: SteerSetup, batch: PromptBatch, gen: Generation) -> list[float]:
    """Mean NLL per token of each generated continuation under the clean model (nan if empty).

    A steered model may emit the image placeholder token (a steered output is arbitrary text). Fed back
    in, the model would take it for an image slot and refuse the batch ("image features and image tokens
    do not match"), so a generated placeholder is masked out of the input (pad id, attention 0); it is
    still scored as a target: its NLL is the clean model's surprise at emitting it."""
    lm = setup.lm
    width = max((len(t) for t in gen.tokens), default=0)
    if width == 0:
        return [float("nan")] * len(gen.tokens)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(gen.tokens), width), pad, dtype=torch.long)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    for i, t in enumerate(gen.tokens):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        valid[i, : len(t)] = True
    placeholder = torch.isin(ids, torch.tensor(sorted(placeholder_ids(lm)), dtype=torch.long))
    fed = ids.masked_fill(placeholder, pad)
    inputs = dict(batch.inputs)
    device = inputs["input_ids"].device
    inputs["input_ids"] = torch.cat([inputs["input_ids"], fed.to(device)], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], (valid & ~placeholder).to(device).long()], 1)
    with torch.no_grad():
        logits = lm.model(**inputs).logits[:, batch.length - 1: -1].float().cpu()
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    return [float(nll[i][valid[i]].mean()) if valid[i].any() else float("nan") for i in range(len(ids))]


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base || steered) per row, in nats."""
    lp, lq = F.log_softmax(base_logits.float(), -1), F.log_softmax(logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


@dataclass
class TokenChange:
    token: str
    token_id: int
    p_base: float
    p_steered: float

    @property
    def delta(self) -> float:
        return self.p_steered - self.p_base


def top_changes(tokenizer, base_logits: torch.Tensor, logits: torch.Tensor, k: int = 10) -> list[TokenChange]:
    """The k next tokens whose probability moved most (by |Δp|), for one sample."""
    p, q = base_logits.float().softmax(-1), logits.float().softmax(-1)
    idx = (q - p).abs().topk(min(k, p.numel())).indices.tolist()
    return [TokenChange(tokenizer.convert_ids_to_tokens(i), i, float(p[i]), float(q[i])) for i in idx]


# ---------------------------------------------------------------- `interp steer`


@dataclass
class SteerResult:
    prompt: str
    image: str
    interventions: list[dict]
    baseline: str
    steered: str
    kl: float
    changes: list[TokenChange]

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "image": self.image, "interventions": self.interventions,
                "baseline": self.baseline, "steered": self.steered, "kl": self.kl,
                "top_changes": [{**vars(c), "delta": c.delta} for c in self.changes]}

    def table(self) -> str:
        """Baseline and steered answers side by side, then the most-moved next-token probabilities."""
        what = "; ".join(_describe(d) for d in self.interventions)
        left = max(len("baseline"), len(self.baseline), 12)
        lines = [f"prompt: {self.prompt}" + (f"   image: {self.image}" if self.image else ""),
                 f"steering: {what}", "",
                 f"{'baseline':{left}s} | steered", f"{'-' * left}-+-{'-' * max(len(self.steered), 7)}",
                 f"{self.baseline:{left}s} | {self.steered}", "",
                 f"next token: KL(baseline || steered) = {self.kl:.4f} nats; largest |Δp|:",
                 f"{'token':>14s} {'p baseline':>11s} {'p steered':>10s} {'Δp':>8s}"]
        lines += [f"{c.token:>14s} {c.p_base:11.4f} {c.p_steered:10.4f} {c.delta:+8.4f}" for c in self.changes]
        return "\n".join(lines)


def _describe(d: dict) -> str:
    return Intervention(**d).describe()


def steer_one(setup: SteerSetup, query: Query, interventions: Sequence[Intervention], *, max_new_tokens: int = 8,
              top_k: int = 10, engine: str = "nnsight", keep_error: bool = True) -> SteerResult:
    resolved = setup.resolve(interventions)
    batch = prepare(setup.lm, [query])
    base = generate(setup, batch, max_new_tokens=max_new_tokens, engine=engine)
    steered = generate(setup, batch, resolved, max_new_tokens=max_new_tokens, engine=engine, keep_error=keep_error)
    kl = float(kl_divergence(base.first_logits, steered.first_logits)[0])
    changes = top_changes(setup.lm.tokenizer, base.first_logits[0], steered.first_logits[0], top_k)
    return SteerResult(query.prompt, query.image_ref, [iv.to_dict() for iv in interventions], base.texts[0],
                       steered.texts[0], kl, changes)
