"""Computations behind the app's pages, free of Streamlit (so they are tested directly):
logit effects of a decoder direction, nearest features by decoder cosine, one feature's activations
on the cache (scored against the shapes world's ground truth by interp.shapes.concepts), and the
top features of every image patch (from the cache's rows, or by running the model on a new image)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------- logit effects


def unembedding(lm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U [d_model, vocab], the final norm's effective scale [d_model] or None) of a loaded model."""
    model = lm.model
    if lm.kind == "hooked-transformer":
        norm = getattr(model, "ln_final", None)
        return model.W_U.detach(), getattr(norm, "w", None)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{lm.name} has no output embedding (lm_head) to project through")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    norm = next((getattr(decoder, a) for a in ("norm", "final_layernorm", "ln_f") if hasattr(decoder, a)), None)
    scale = getattr(norm, "weight", None)
    if scale is not None:
        scale = scale.detach().float()
        if "gemma" in type(norm).__name__.lower():  # Gemma's RMSNorm multiplies by (1 + weight)
            scale = scale + 1.0
    return head.weight.detach().T, scale


@dataclass(frozen=True)
class TokenEffect:
    token: str
    token_id: int
    logit: float


def logit_effects(direction: torch.Tensor, w_u: torch.Tensor, scale: torch.Tensor | None, tokenizer,
                  k: int = 10) -> tuple[list[TokenEffect], list[TokenEffect]]:
    """The tokens a decoder direction most promotes and most suppresses: (direction * norm scale) @ W_U."""
    d = direction.detach().float().to(w_u.device)
    if scale is not None:
        d = d * scale.to(d.device)
    logits = (d @ w_u.float()).cpu()
    k = min(k, logits.numel())
    top, bottom = logits.topk(k), (-logits).topk(k)

    def effects(idx: torch.Tensor) -> list[TokenEffect]:
        ids = idx.tolist()
        return [TokenEffect(str(t), i, float(logits[i])) for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids))]

    return effects(top.indices), effects(bottom.indices)


# ---------------------------------------------------------------- decoder geometry


def unit_rows(w_dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows scaled to unit norm, in float16, for cosine similarities: half the memory and time of the
    [d_sae, d_in] matrix-vector product a feature page runs (0.5 -> 0.2 s at 131072 x 4096; cosines within
    1e-4 of float32's)."""
    w = w_dec.detach()
    out = torch.empty(w.shape, dtype=torch.float16, device=w.device)
    for s in range(0, len(w), 16384):  # in blocks: no float32 copy of the whole matrix on the way
        block = w[s:s + 16384].float()
        out[s:s + 16384] = block / block.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out


def nearest_features(unit: torch.Tensor, feature: int, k: int = 10) -> list[tuple[int, float]]:
    """The k other features whose decoder directions have the highest cosine with `feature`'s."""
    cos = (unit @ unit[feature]).float()
    cos[feature] = -np.inf
    top = cos.topk(min(k, len(cos) - 1))
    return [(int(i), float(c)) for i, c in zip(top.indices, top.values)]


# ---------------------------------------------------------------- ground truth for one feature


@torch.no_grad()
def feature_column(sae, reader, feature: int, rows: np.ndarray | None = None, chunk_rows: int = 16384) -> np.ndarray:
    """One feature's activation on every cached row (or on `rows`), encoded chunk by chunk."""
    from explain.feature_reader import chunk_rows_for

    step = chunk_rows_for(sae.cfg.d_sae, cap=chunk_rows)
    out = np.concatenate([sae.encode(reader.read(s, min(s + step, reader.n_rows)).to(sae.device))[:, feature]
                          .float().cpu().numpy() for s in range(0, reader.n_rows, step)] or [np.zeros(0, np.float32)])
    return out if rows is None else out[rows]


# ---------------------------------------------------------------- features per patch


@dataclass
class PatchFeatures:
    """The image-patch tokens of one image with their strongest features."""

    tokens: np.ndarray  # token table rows (pixel boxes in the original image)
    top_idx: np.ndarray  # [patches, k] feature indices, strongest first
    top_val: np.ndarray  # [patches, k] their activations (0 where fewer than k fire)
    features: np.ndarray  # [U] every feature in some patch's top k
    acts: np.ndarray  # [patches, U] those features' activations on every patch

    def label(self, i: int) -> str:
        t = self.tokens[i]
        tile = f"tile {t['tile']}, " if t["tile"] > 0 else ""
        return f"{tile}row {t['row']}, col {t['col']}"

    def column(self, feature: int) -> np.ndarray:
        """`feature`'s activation on every patch (it must be one of `features`)."""
        return self.acts[:, int(np.flatnonzero(self.features == feature)[0])]


@torch.no_grad()
def patch_features(sae, rows: torch.Tensor, tokens: np.ndarray, k: int = 8) -> PatchFeatures:
    """Top-k features of each image-patch row, encoded in chunks so d_sae can be large."""
    from explain.feature_reader import chunk_rows_for
    from interp.cache.format import is_image_patch

    keep = is_image_patch(tokens["role"])
    x, tokens = rows[torch.from_numpy(keep)], tokens[keep]
    k = min(k, sae.cfg.d_sae)
    step = chunk_rows_for(sae.cfg.d_sae)
    vals, idx = [], []
    for s in range(0, len(x), step):
        v, i = sae.encode(x[s: s + step].to(sae.device)).float().topk(k, dim=1)
        vals.append(v.cpu())
        idx.append(i.cpu())
    top_val = torch.cat(vals).numpy() if vals else np.zeros((0, k), np.float32)
    top_idx = torch.cat(idx).numpy() if idx else np.zeros((0, k), np.int64)
    features = np.unique(top_idx[top_val > 0])
    acts = np.zeros((len(x), len(features)), np.float32)
    for j, f in enumerate(features):
        hit = top_idx == f
        acts[:, j] = np.where(hit, top_val, 0).max(1)
    return PatchFeatures(tokens, top_idx, np.where(top_val > 0, top_val, 0), features, acts)


def cached_rows(reader, sample: int) -> tuple[torch.Tensor, np.ndarray]:
    """(activation rows, token table rows) of one cached sample (a row of the samples table)."""
    s = reader.sample(sample)
    return reader.sample_activations(s), s.tokens


def model_rows(lm, cache_meta: dict, image, prompt: str, engine: str = "nnsight") -> tuple[torch.Tensor, np.ndarray]:
    """(activation rows, token table rows) of a new image and prompt at the cache's layer, computed
    exactly as `interp cache` does (interp.cache.CacheWriter: interp.model.inputs, hooks.capture, token_map)."""
    from interp.cache.writer import CacheConfig, CacheWriter
    from interp.cache.data import Sample

    cfg = CacheConfig(model=cache_meta.get("model", lm.name), layer=cache_meta["layer"],
                      site=cache_meta.get("site", "resid"), prompt_template="{image}{text}",
                      roles=("image_patch",), engine=cache_meta.get("engine") or engine)
    writer = CacheWriter(cfg, lm=lm)
    rows, table, _ = writer.run_batch([Sample(0, "upload", image.convert("RGB"), text=prompt)])
    return torch.from_numpy(rows), table
