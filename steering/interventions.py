"""Feature interventions at an SAE's layer: what to change, where, and the edit that does it.

An intervention rewrites one feature's activation (clamp it to a value, add to it, or zero
it) at chosen token positions, and the layer output moves by exactly the decoder's image of
that change: x' = x + decode(acts') - decode(acts) = x + (acts' - acts) @ W_dec. The SAE's
reconstruction error stays in x, so a feature the edit leaves alone costs nothing: an edit
that changes no activation returns x bit for bit. (`keep_error=False` instead replaces the
edited rows by the SAE's reconstruction, for splicing experiments.)

The reference method of steering.methods is the LMMs-Lab Multimodal-SAE's steering ("Large Multi-modal
Models Can Interpret Features in Large Multi-modal Models", arXiv 2411.14982; `clamp_features_max` in
EvolvingLMMs-Lab/multimodal-sae, sae_auto_interp/features/steering.py): in the prompt's forward it sets
the feature's encoder PRE-activation to a value at every position and re-applies top-k, and in every
forward (generated tokens too) the layer's output becomes the SAE's reconstruction, error term dropped.
Here that is mode "clamp-pre" at positions "prompt" with `splice=True`.

`FeatureEdit` is one callable, (layer output, generation step) -> new output, so the nnsight
engine and the plain-hook engine run the very same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

MODES = ("clamp", "add", "ablate", "clamp-pre")
PRE_MODES = ("clamp-pre",)  # edits of the encoder's pre-activation: the SAE's sparsity is re-applied after them
UNITS = ("absolute", "max")  # "max": a multiple of the feature's max activation (from features.h5)
POSITIONS = ("image", "object", "text", "generated", "all", "prompt")
PROMPT_POSITIONS = ("image", "object", "text", "all")  # the masks a prompt batch carries (see steer.PromptBatch)
PREFILL_ONLY = {"prompt": "all"}  # positions of the prompt's forward alone, and the prompt mask they use


class InterventionError(ValueError):
    """An intervention that cannot be applied (bad mode, value, feature, or an SAE that does not fit)."""


@dataclass(frozen=True)
class Intervention:
    """Change `feature` at `positions`: clamp it to `value`, add `value` to it, or ablate it (value unused);
    "clamp-pre" sets its encoder pre-activation to `value` and re-applies the SAE's sparsity (see
    `sparsify`), so the clamped feature can push others out of the top k (the reference method).

    positions: "image" (image-patch tokens of the prompt), "object" (the image patches of the
    object the question is about: shapes-world questions, see steer.question_region), "text" (the
    user's text in the prompt), "generated" (tokens the model generates; the first answer token is predicted
    from the prompt, so it is not affected), "all" (every non-padding prompt token and every
    generated token), "prompt" (every non-padding prompt token, and no generated one).
    """

    feature: int
    mode: str = "clamp"
    value: float = 0.0
    unit: str = "absolute"
    positions: str = "image"

    def __post_init__(self) -> None:
        if isinstance(self.feature, bool) or int(self.feature) != self.feature or self.feature < 0:
            raise InterventionError(f"feature must be a non-negative integer, got {self.feature!r}")
        object.__setattr__(self, "feature", int(self.feature))
        for name, allowed in (("mode", MODES), ("unit", UNITS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise InterventionError(f"unknown {name} {getattr(self, name)!r}; use one of {', '.join(allowed)}")
        check_strength(self.value, f"value of the intervention on feature {self.feature}")
        object.__setattr__(self, "value", float(self.value))

    @classmethod
    def parse(cls, text: str) -> Intervention:
        """`FEATURE:MODE[:VALUE[:UNIT[:POSITIONS]]]`, e.g. `142:clamp:2:max:image` or `99:ablate`."""
        parts = text.split(":")
        if not 2 <= len(parts) <= 5 or not parts[0].strip().lstrip("-").isdigit():
            raise InterventionError(f"cannot read intervention {text!r}: write "
                                    "FEATURE:MODE[:VALUE[:UNIT[:POSITIONS]]], "
                                    "e.g. 142:clamp:2:max:image or 99:ablate")
        try:
            value = float(parts[2]) if len(parts) > 2 else 0.0
        except ValueError:
            raise InterventionError(f"cannot read the value {parts[2]!r} of intervention {text!r}: "
                                    "not a number") from None
        kw = dict(zip(("unit", "positions"), parts[3:]))
        return cls(int(parts[0]), parts[1], value, **kw)

    def describe(self) -> str:
        if self.mode == "ablate":
            return f"{self.feature} ablate @{self.positions}"
        unit = "×max" if self.unit == "max" else ""
        return f"{self.feature} {self.mode} {self.value:g}{unit} @{self.positions}"

    def to_dict(self) -> dict:
        return asdict(self)


def sparsify(sae, pre: torch.Tensor) -> torch.Tensor:
    """Activations from (edited) pre-activations in `SAE.raw_pre_acts`' units: the SAE's own activation,
    then, for SAEs whose sparsity is a k, at most ceil(k) features per row (the largest): the reference's
    top-k re-application. For a TopK SAE this is exactly `encode`; a BatchTopK SAE's inference threshold
    can keep more than k in a row, and the cap then also drops its weakest features."""
    acts = sae.activate_raw(pre)
    if not sae.arch.uses_k or math.ceil(sae.cfg.k) >= acts.shape[-1]:
        return acts
    vals, idx = acts.topk(math.ceil(sae.cfg.k), dim=-1)
    return torch.zeros_like(acts).scatter_(-1, idx, vals)


def check_strength(value: float, what: str = "strength") -> float:
    """The value as a float; NaN and infinities are refused (they would poison every later activation)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InterventionError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InterventionError(f"{what} must be finite, got {value!r}")
    return v


def check_feature(feature: int, d_sae: int) -> int:
    if not 0 <= int(feature) < d_sae:
        raise InterventionError(f"feature {feature} is out of range: this SAE has {d_sae} features "
                                f"(valid indices 0..{d_sae - 1})")
    return int(feature)


def check_interventions(interventions: Sequence[Intervention], d_sae: int, have_max: bool) -> None:
    """Every feature in range, and max activations at hand where a strength is given in multiples of them."""
    for iv in interventions:
        check_feature(iv.feature, d_sae)
        if iv.unit == "max" and iv.mode != "ablate" and not have_max:
            raise InterventionError(f"intervention {iv.describe()} gives its strength in multiples of the feature's "
                                    "max activation, which needs the SAE's features.h5 in the run (`interp features "
                                    "RUN`), or use unit absolute")


def resolve(interventions: Sequence[Intervention], d_sae: int,
            max_acts: Sequence[float] | np.ndarray | None = None) -> list[Intervention]:
    """The interventions with every value in absolute units, features checked against the SAE."""
    check_interventions(interventions, d_sae, max_acts is not None)
    out = []
    for iv in interventions:
        if iv.unit == "max" and iv.mode != "ablate":
            m = float(max_acts[iv.feature])
            if not m > 0:
                raise InterventionError(f"feature {iv.feature} never fired in the features file (max {m:g}), so "
                                        f"{iv.value:g}×max is meaningless: give the strength in absolute units")
            iv = replace(iv, value=iv.value * m, unit="absolute")
        out.append(iv)
    return out


def layer_width(lm) -> int | None:
    """d_model of the model's decoder layers (None where the config does not say)."""
    if lm.kind == "hooked-transformer":
        return int(lm.model.cfg.d_model)
    config = lm.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
    return int(width) if width else None


def sae_hook(lm, sae, layer: int | str | None = None):
    """The HookPoint an SAE reads, checked against the model: it must exist there and have the SAE's width.

    `layer` (optional) must name the same site as the SAE's own hook: steering an SAE at a
    layer it was not trained on would decode its features into the wrong basis."""
    from interp.model.layers import UnknownLayerError, resolve_layer

    own = sae.cfg.hook_name or (sae.cfg.metadata or {}).get("cache_layer")
    if own is None and layer is None:
        raise InterventionError("this SAE does not record the layer it was trained on (no hook_name in cfg.json): "
                                "name the layer (--layer)")
    try:
        hook = resolve_layer(lm, own) if own is not None else None
    except UnknownLayerError as e:
        raise InterventionError(f"the SAE was trained on layer {own!r}, which {lm.name} does not have ({e})") from None
    if layer is not None:
        wanted = resolve_layer(lm, layer, site=hook.site if hook else "resid")
        if hook is not None and wanted.module_path != hook.module_path:
            raise InterventionError(f"the SAE was trained on {hook.name} ({hook.module_path}), not on {wanted.name} "
                                    f"({wanted.module_path}): use that layer or an SAE trained on {wanted.name}")
        hook = wanted
    width = layer_width(lm)
    if width is not None and width != sae.cfg.d_in:
        raise InterventionError(f"the SAE's width d_in={sae.cfg.d_in} does not fit {lm.name}: layer {hook.name} "
                                f"({hook.module_path}) has width d_model={width}")
    return hook


class FeatureEdit:
    """The layer-output edit for a batch: `edit(output, step)` with step 0 the prompt's forward
    ([B, T, d]) and step s >= 1 the forward of generated token s ([B, 1, d], KV cache).

    `splice=True` runs the model on the SAE's reconstruction at this layer: every non-padding row of
    every forward (generated tokens too) becomes decode(its activations, edited where the interventions
    reach), so the error term is dropped everywhere, as the reference method does; `keep_error` is then
    moot."""

    def __init__(self, sae, interventions: Sequence[Intervention], masks: Mapping[str, torch.Tensor],
                 keep_error: bool = True, splice: bool = False):
        bad = [iv for iv in interventions if iv.unit != "absolute" and iv.mode != "ablate"]
        if bad:
            raise InterventionError(f"resolve() the interventions first: {bad[0].describe()} is not in absolute units")
        for iv in interventions:
            check_feature(iv.feature, sae.cfg.d_sae)
            if iv.positions in PROMPT_POSITIONS and iv.positions not in masks:
                raise InterventionError(f"{iv.describe()}: this batch has no {iv.positions!r} positions (positions "
                                        "'object' need shapes-world images and a question that names one object, "
                                        "e.g. 'what color is the circle ?'); use one of "
                                        f"{', '.join(p for p in POSITIONS if p in masks or p not in PROMPT_POSITIONS)}")
        self.sae, self.interventions, self.keep_error, self.splice = sae, list(interventions), keep_error, splice
        self._feats = sorted({iv.feature for iv in self.interventions})  # the columns an edit changes
        self._column = {f: j for j, f in enumerate(self._feats)}
        # a pre-activation edit can move any column (top-k re-applied), and splicing decodes every row anew
        self._dense = splice or any(iv.mode in PRE_MODES for iv in self.interventions)
        self.masks = {k: v.bool() for k, v in masks.items()}
        self.prompt_shape = tuple(next(iter(self.masks.values())).shape)

    def _rows(self, positions: str, step: int, shape: tuple[int, int]) -> torch.Tensor | None:
        if step == 0:
            if positions in PREFILL_ONLY:
                return self.masks[PREFILL_ONLY[positions]]
            return self.masks[positions] if positions in PROMPT_POSITIONS else None
        return torch.ones(shape, dtype=torch.bool) if positions in ("generated", "all") else None

    def __call__(self, out: torch.Tensor, step: int) -> torch.Tensor:
        if isinstance(out, (tuple, list)):  # families whose layers return (hidden, ...) tuples
            return type(out)((self(out[0], step), *out[1:]))
        shape = tuple(out.shape[:2])
        if step == 0 and shape != self.prompt_shape:
            raise RuntimeError(f"the prompt's forward gave a layer output of shape {tuple(out.shape)}, but the batch "
                               f"has {self.prompt_shape} tokens: steering needs generate with use_cache=True")
        if step > 0 and shape[1] != 1:
            raise RuntimeError(f"generation step {step} ran {shape[1]} positions at once: steering needs the KV cache "
                               "(use_cache=True)")
        rows = [self._rows(iv.positions, step, shape) for iv in self.interventions]
        rows = [None if r is None else r.to(out.device) for r in rows]
        union = torch.zeros(shape, dtype=torch.bool, device=out.device)
        for r in rows:
            if r is not None:
                union |= r
        if self.splice:
            union |= self._rows("all", step, shape).to(out.device)
        if not union.any():
            return out
        x = out[union]
        sels = [None if r is None else r[union] for r in rows]
        edited = self._dense_edit(x, sels) if self._dense else self._column_edit(x, sels)
        result = out.clone()
        result[union] = edited
        return result

    @staticmethod
    def _set(acts: torch.Tensor, iv: Intervention, sel: torch.Tensor, j: int) -> None:
        """Apply a post-activation intervention to column j of `acts` at rows `sel`, in place."""
        if iv.mode == "clamp":
            acts[sel, j] = iv.value
        elif iv.mode == "add":
            acts[sel, j] += iv.value
        elif iv.mode == "ablate":
            acts[sel, j] = 0.0

    def _column_edit(self, x: torch.Tensor, sels: list) -> torch.Tensor:
        acts = self.sae.encode(x)
        # only the intervened features' columns change: edit those [rows, F] and decode the change
        # through their decoder rows (rank F), not a dense [rows, d_sae] @ W_dec
        feats, column = self._feats, self._column
        old = acts[:, feats]
        new = old.clone()
        for iv, sel in zip(self.interventions, sels):
            if sel is not None:
                self._set(new, iv, sel, column[iv.feature])
        # decode is affine: decode(new) - decode(acts) == (new - acts) @ W_dec, exactly 0 where nothing changed
        if self.keep_error:
            return x + ((new - old) @ self.sae.W_dec[feats]).to(x.dtype)
        acts[:, feats] = new
        return self.sae.decode(acts).to(x.dtype)

    def _dense_edit(self, x: torch.Tensor, sels: list) -> torch.Tensor:
        """Pre-activation edits first (their rows re-sparsified: `sparsify`), then the others on the result."""
        sae = self.sae
        acts = sae.encode(x)
        new = acts.clone()
        pre_rows = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        pre = None
        for iv, sel in zip(self.interventions, sels):
            if sel is not None and iv.mode in PRE_MODES:
                pre = sae.raw_pre_acts(x) if pre is None else pre
                pre[sel, iv.feature] = iv.value
                pre_rows |= sel
        if pre is not None:
            new[pre_rows] = sparsify(sae, pre[pre_rows])
        for iv, sel in zip(self.interventions, sels):
            if sel is not None and iv.mode not in PRE_MODES:
                self._set(new, iv, sel, iv.feature)
        if self.keep_error and not self.splice:  # exactly x where no activation changed, as in _column_edit
            return x + ((new - acts) @ sae.W_dec).to(x.dtype)
        return sae.decode(new).to(x.dtype)
