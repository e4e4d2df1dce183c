"""Address a layer of the language model by index, canonical name, or module path.

Canonical names are the same for every family ("layers.3", "layers.3.attn", "layers.3.mlp"),
so configs, caches and SAEs can name a site without knowing that Idefics3 keeps its decoder
at `model.text_model.layers` and TransformerLens at `blocks`. The decoder layer list is found
from the model itself (the longest outermost list of same-class blocks under the language
model), not from a per-family table, so new families work when their layout is conventional.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from interp.infra.cli_config import Command, positional
from interp.model.models import LoadedModel

SITES = ("resid", "attn", "mlp")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
TL_HOOKS = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}
NOT_LANGUAGE = ("vision", "visual", "image", "audio")  # lists under these are not the LLM's decoder


class UnknownLayerError(ValueError):
    """A layer or site that the model does not have; the message lists the valid ones."""


@dataclass(frozen=True)
class HookPoint:
    name: str  # canonical: "layers.3" (resid), "layers.3.attn", "layers.3.mlp"
    module_path: str  # dotted path from the model root; for TransformerLens the hook name
    index: int
    site: str  # one of SITES


def decoder_layers(lm: LoadedModel) -> list[tuple[str, nn.Module]]:
    """(module path, layer) for each decoder layer of the language model, in order."""
    model = lm.model
    if lm.kind == "hooked-transformer":
        return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    root = model.get_decoder() if hasattr(model, "get_decoder") else None
    root = root if isinstance(root, nn.Module) else model
    prefix = next(name for name, module in model.named_modules() if module is root)
    lists = [(name, module) for name, module in root.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
             and not any(word in name.lower() for word in NOT_LANGUAGE)]
    outermost = [(name, module) for name, module in lists  # not lists inside a layer (experts, sub-blocks)
                 if not any(name.startswith(f"{other}.") for other, _ in lists)]
    if not outermost:
        raise UnknownLayerError(f"found no decoder layer list in {type(model).__name__} ({lm.name})")
    name, layers = max(outermost, key=lambda c: len(c[1]))  # max keeps the first of equally long lists
    path = ".".join(p for p in (prefix, name) if p)
    return [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]


def _site_path(lm: LoadedModel, layer_path: str, layer: nn.Module, site: str) -> str | None:
    if lm.kind == "hooked-transformer":
        return f"{layer_path}.{TL_HOOKS[site]}" if hasattr(layer, TL_HOOKS[site]) else None
    if site == "resid":
        return layer_path
    names = ATTN_NAMES if site == "attn" else MLP_NAMES
    child = next((n for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)
    return f"{layer_path}.{child}" if child else None


def hook_points(lm: LoadedModel) -> list[HookPoint]:
    """Every addressable site, ordered by layer, then resid, attn, mlp."""
    points = []
    for i, (path, layer) in enumerate(decoder_layers(lm)):
        for site in SITES:
            module_path = _site_path(lm, path, layer, site)
            if module_path is not None:
                points.append(HookPoint(f"layers.{i}" + ("" if site == "resid" else f".{site}"), module_path, i, site))
    return points


def list_layers(lm: LoadedModel) -> list[str]:
    """All valid canonical names."""
    return [p.name for p in hook_points(lm)]


def _valid_summary(points: list[HookPoint]) -> str:
    n = points[-1].index + 1
    layers = ", ".join(f"layers.{i}" for i in range(n)) if n <= 4 else f"layers.0 … layers.{n - 1}"
    extra = sorted({p.site for p in points} - {"resid"}, key=SITES.index)
    sites = f", each with {' and '.join('.' + s for s in extra)}" if extra else ""
    return (f"{layers}{sites} (or an index from {-n} to {n - 1}, or a module path such as "
            f"{points[0].module_path})")


def resolve_layer(lm: LoadedModel, layer: int | str, site: str = "resid") -> HookPoint:
    """The hook point for an int index (negative counts from the end), a canonical name, or a module path.

    `site` applies to indices and to names of a whole layer ("layers.3", or its module path);
    a name of an attn/mlp site ("layers.3.attn", "...layers.3.self_attn") is that site.
    """
    points = hook_points(lm)
    if site not in SITES:
        raise UnknownLayerError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, int):
        n = points[-1].index + 1
        index = layer + n if layer < 0 else layer
    else:
        named = next((p for p in points if layer in (p.name, p.module_path)), None)
        if named is not None and named.site != "resid":
            return named
        index = named.index if named is not None else None
    match = next((p for p in points if p.index == index and p.site == site), None)
    if match is None:
        raise UnknownLayerError(f"unknown layer {layer!r} (site {site!r}) in {lm.name}; "
                                f"valid: {_valid_summary(points)}")
    return match


@dataclass
class LayersConfig:
    """`interp layers`: a model's hookable layers."""

    model: str = field(default="shapes-subject", metadata=positional(required=False))
    """organism name, hub id, local path, or tl:NAME"""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N"""


def layers(cfg: LayersConfig) -> tuple[LoadedModel, list[HookPoint]]:
    from interp.model.models import load_model

    lm = load_model(cfg.model, device=cfg.device)
    return lm, hook_points(lm)


def _report(result, cfg: LayersConfig) -> None:
    lm, points = result
    print(f"{lm.name} ({lm.family}, {lm.kind}): {len(decoder_layers(lm))} decoder layers")
    for p in points:
        print(f"  {p.name:16s} {p.module_path}")


COMMANDS = [Command("layers", LayersConfig, layers, "list a model's hookable layers and their module paths",
                    report=_report)]
