"""Attribution patching over SAE features: which features push the answer over a baseline token.

One forward and one backward pass. At the SAE's layer the output is rewritten as
x + (decode(acts) - decode(acts).detach()): the value is x exactly (the error term is a
constant and the forward is unchanged), but the gradient reaches the feature activations.
The score of feature f at position p is grad(logit[answer] - logit[baseline]) · act, the
first-order estimate of what removing that activation would cost the logit difference, so
the predicted effect of ablating it is -score. `ablation_effects` measures the real effect
(one batched forward per chunk of ablations, error term kept) to validate the estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from interp.shapes.concepts import average_ranks
from steering.interventions import InterventionError
from steering.steer import PromptBatch, SteerSetup


@dataclass
class Attribution:
    """One sample's attribution, sparse: one entry per active (position, feature)."""

    metric: float  # logit[answer] - logit[baseline] of the clean model at the last prompt token
    answer: int  # token ids
    baseline: int
    position: np.ndarray  # [n] absolute position in the batch's (left-padded) sequence
    feature: np.ndarray  # [n]
    act: np.ndarray  # [n] activation
    score: np.ndarray  # [n] grad * activation
    d_sae: int
    tokens: list[str] = field(default_factory=list)  # the token at each position of the sequence

    def total(self) -> np.ndarray:
        """[d_sae] score summed over positions."""
        return np.bincount(self.feature, weights=self.score, minlength=self.d_sae)

    def active_features(self) -> np.ndarray:
        return np.unique(self.feature)

    def ranking(self, k: int | None = None, by: str = "signed") -> list[int]:
        """Active features by total score, best first ("signed": most for the answer; "abs": largest magnitude)."""
        total, feats = self.total(), self.active_features()
        key = total[feats] if by == "signed" else np.abs(total[feats])
        order = feats[np.argsort(-key, kind="stable")]
        return order[:k].tolist() if k else order.tolist()

    def rank_of(self, feature: int, by: str = "signed") -> int | None:
        """1-based rank of `feature` among active features (None: inactive)."""
        order = self.ranking(by=by)
        return order.index(feature) + 1 if feature in order else None

    def per_position(self, k: int = 3) -> list[tuple[int, str, list[tuple[int, float]]]]:
        """(position, token, [(feature, score)] top k by |score|) for each position with active features."""
        out = []
        for p in np.unique(self.position):
            sel = np.flatnonzero(self.position == p)
            sel = sel[np.argsort(-np.abs(self.score[sel]), kind="stable")][:k]
            out.append((int(p), self.tokens[p] if self.tokens else "", [(int(self.feature[i]), float(self.score[i]))
                                                                       for i in sel]))
        return out


@contextmanager
def _frozen(model: torch.nn.Module):
    """No parameter gradients: the backward then only runs from the metric to the features."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def token_id(tokenizer, text_or_id: str | int) -> int:
    """A token id for an answer given as text (its first token; the model's own spelling) or as an id."""
    if isinstance(text_or_id, int) or (isinstance(text_or_id, str) and text_or_id.isdigit()
                                         and text_or_id not in tokenizer.get_vocab()):
        i = int(text_or_id)
        if not 0 <= i < len(tokenizer):
            raise InterventionError(f"token id {i} is out of range (vocabulary of {len(tokenizer)})")
        return i
    ids = tokenizer(text_or_id, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InterventionError(f"{text_or_id!r} has no tokens")
    return int(ids[0])


def attribute(setup: SteerSetup, batch: PromptBatch, answers: Sequence[int | None] | None = None,
              baselines: Sequence[int | None] | None = None, positions: str = "image",
              steps: int = 1) -> list[Attribution]:
    """Attribution of each sample's logit difference to the SAE features at `positions` (image/text/all).

    A missing answer is the clean model's top next token, a missing baseline its runner-up.
    `steps=1` is attribution patching (the gradient at the clean activations). `steps=k > 1`
    integrates the gradient along acts * alpha, alpha at k midpoints in (0, 1) (integrated
    gradients from "these features ablated"): the k scaled copies run in the same single
    forward and backward pass as a k-times larger batch. It costs k times the memory and
    fixes the linear estimate where it is worst: a feature that dominates its residual row,
    along which normalisation layers are flat, gets a near-zero or negative gradient even
    though ablating it changes everything."""
    from interp.model.hooks import patch_output

    if positions not in batch.masks:
        raise InterventionError(f"attribution positions must be one of {', '.join(batch.masks)}, not {positions!r}")
    if int(steps) != steps or steps < 1:
        raise InterventionError(f"steps must be a positive integer, got {steps!r}")
    lm, sae = setup.lm, setup.sae
    n = len(batch.queries)
    answers, baselines = list(answers or [None] * n), list(baselines or [None] * n)
    alphas = [1.0] if steps == 1 else [1.0] + [(j + 0.5) / steps for j in range(steps)]  # copy 0 is the clean run
    c = len(alphas)
    inputs = batch.inputs if c == 1 else {k: v.repeat(c, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v
                                          for k, v in batch.inputs.items()}
    mask = batch.masks[positions].repeat(c, 1).to(lm.device)
    per_copy = int(batch.masks[positions].sum())
    scale = torch.tensor(alphas, dtype=sae.dtype, device=lm.device).repeat_interleave(per_copy)[:, None]
    box = {}

    def edit(out: torch.Tensor) -> torch.Tensor:
        if "acts" in box or tuple(out.shape[:2]) != tuple(mask.shape):
            return out
        x = out[mask]
        acts = sae.encode(x.detach()).detach()
        scaled = (acts * scale).requires_grad_(True)  # == acts bit for bit in the clean copy
        box["acts"], box["scaled"] = acts, scaled
        return out.index_put((mask,), x + (sae.decode(scaled) - sae.decode(acts)).to(x.dtype))

    with _frozen(lm.model), torch.enable_grad(), patch_output(lm.model, setup.hook.module_path, edit):
        logits = lm.model(**inputs).logits[:, -1].float()
        clean = logits[:n].detach()
        top2 = clean.topk(2, dim=-1).indices.cpu()
        ans = torch.tensor([a if a is not None else int(top2[i, 0]) for i, a in enumerate(answers)])
        base = torch.tensor([b if b is not None else int(top2[i, 1 if int(top2[i, 0]) == int(ans[i]) else 0])
                             for i, b in enumerate(baselines)])
        rows = torch.arange(n * c)
        metric = logits[rows, ans.repeat(c).to(logits.device)] - logits[rows, base.repeat(c).to(logits.device)]
        if "acts" not in box:  # no selected positions: nothing to attribute
            grads = acts = torch.zeros(0, sae.cfg.d_sae)
        else:
            acts = box["acts"][:per_copy]
            (grads,) = torch.autograd.grad(metric.sum(), box["scaled"])
            grads = grads.reshape(c, per_copy, -1)
            grads = grads[0] if steps == 1 else grads[1:].mean(0)
    metric = metric[:n].detach().cpu()
    scores = (grads * acts).detach().float().cpu()
    acts = acts.detach().float().cpu()
    where = batch.masks[positions].nonzero()  # rows of `acts`, in order: (sample, position)
    out = []
    for i in range(n):
        mine = (where[:, 0] == i).nonzero().flatten()
        r, f = (acts[mine] > 0).nonzero(as_tuple=True)
        rows_i = mine[r]
        out.append(Attribution(float(metric[i]), int(ans[i]), int(base[i]), where[rows_i, 1].numpy(), f.numpy(),
                               acts[rows_i, f].numpy(), scores[rows_i, f].numpy(), sae.cfg.d_sae,
                               batch.tokens(lm.tokenizer, i)))
    return out


@torch.no_grad()
def ablation_effects(setup: SteerSetup, batch: PromptBatch, sample: int, attribution: Attribution,
                     per_position: bool = False, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) change of the metric when each active feature is ablated (error term kept).

    Per feature over all its positions, or (per_position) each active (position, feature) alone.
    The prediction is -score, summed the same way."""
    from interp.model.hooks import patch_output

    lm, sae = setup.lm, setup.sae
    if per_position:
        units = [((int(p),), int(f)) for p, f in zip(attribution.position, attribution.feature)]
        predicted = -attribution.score
    else:
        feats = attribution.active_features()
        units = [(tuple(int(p) for p in attribution.position[attribution.feature == f]), int(f)) for f in feats]
        predicted = -attribution.total()[feats]
    one = {k: v[sample: sample + 1] for k, v in batch.inputs.items()}
    ids = torch.tensor([attribution.answer, attribution.baseline])
    true = []
    for s in range(0, len(units), chunk):
        part = units[s: s + chunk]
        m = len(part)
        inputs = {k: v.expand(m + 1, *v.shape[1:]) for k, v in one.items()}  # the last copy stays clean
        rows = torch.zeros(m + 1, batch.length, dtype=torch.bool)
        for j, (pos, _) in enumerate(part):
            rows[j, list(pos)] = True
        feats = torch.tensor([f for _, f in part])

        def edit(out: torch.Tensor) -> torch.Tensor:
            if tuple(out.shape[:2]) != tuple(rows.shape):
                return out
            r = rows.to(out.device)
            x = out[r]
            which = feats.to(out.device)[r.nonzero()[:, 0]]  # the feature each selected row ablates (clean row: none)
            a = sae.encode(x).gather(1, which[:, None])
            return out.index_put((r,), x - (a * sae.W_dec[which]).to(x.dtype))

        with patch_output(lm.model, setup.hook.module_path, edit):
            logits = lm.model(**inputs).logits[:, -1].float().cpu()
        metric = logits[:, ids[0]] - logits[:, ids[1]]
        true.append(metric[:m] - metric[m])
    return np.asarray(predicted, float), torch.cat(true).numpy().astype(float) if true else np.zeros(0)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan with fewer than 3 points or no spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
