"""EleutherAI sparsify's on-disk SAE format, both ways, and detection of an SAE directory's format.

sparsify (eai-sparsify 1.3) saves one folder per hookpoint; the multimodal-sae release
(lmms-lab/llama3-llava-next-8b-hf-sae-131k) is a directory of such folders:

    RUN/                       optional config.json: sparsify's RunConfig, {"model": ...} among others
      model.layers.24/
        cfg.json               activation, expansion_factor, normalize_decoder, num_latents, k,
                               multi_topk, skip_connection, transcode, d_in
        sae.safetensors        encoder.weight [latents, d_in], encoder.bias [latents],
                               W_dec [latents, d_in], b_dec [d_in]

Its TopK encoder is relu(linear(x - b_dec)) followed by top-k; the decoder adds b_dec to the
sum of the selected decoder rows. That is our TopK SAE with W_enc = encoder.weight.T (kept
as a transposed view, so the encoder matmul is the same BLAS call and the activations are
bit-identical), b_enc = encoder.bias, apply_b_dec_to_input=True. Decoding agrees to float32
rounding: sparsify sums the k rows with embedding_bag, we do a dense matmul.

A folder records neither the model nor (except through its name) the layer. The layer comes
from the folder name, `model.layers.24` -> our canonical `layers.24` (interp.model.layers), with
`.mlp` / `.self_attn` suffixes mapped to the `.mlp` / `.attn` sites. The model comes from the
caller, else from the run's config.json ("model"), else stays unknown (commands then ask for it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saes.sae import CFG_FILENAME, DTYPES, SAE, WEIGHTS_FILENAME, SAEConfig

SPARSIFY_WEIGHTS = "sae.safetensors"
RUN_CONFIG = "config.json"  # sparsify's run-level config (RunConfig), next to the hookpoint folders
CFG_KEYS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
            "skip_connection", "transcode", "d_in")
REQUIRED_KEYS = ("d_in", "k")  # sparsify defaults every other key
SPARSIFY_DEFAULTS = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": 0,
                     "multi_topk": False, "skip_connection": False, "transcode": False}
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
# module names sparsify hooks inside a decoder layer -> our site suffix
SITE_OF_MODULE = {"": "", "mlp": ".mlp", "feed_forward": ".mlp", "ffn": ".mlp", "self_attn": ".attn", "attn": ".attn",
                  "attention": ".attn", "self_attention": ".attn"}
MODULE_OF_SITE = {"": "", ".mlp": ".mlp", ".attn": ".self_attn"}
MULTIMODAL_SAE_PREFIX = "model."  # multimodal-sae names hookpoints relative to the language model: model.layers.N

FORMAT_SAELENS = "saelens"  # ours: cfg.json + sae_weights.safetensors (what sae_lens reads and writes)
FORMAT_SPARSIFY = "sparsify"  # one hookpoint folder: cfg.json + sae.safetensors
FORMAT_SPARSIFY_RUN = "sparsify-run"  # a directory of hookpoint folders
FORMATS = (FORMAT_SAELENS, FORMAT_SPARSIFY, FORMAT_SPARSIFY_RUN)


class SparsifyFormatError(ValueError):
    """A sparsify folder that cannot be read (bad cfg.json, weights that do not fit it, an unsupported option)."""


# ---------------------------------------------------------------- layer names


def layer_for_hookpoint(hookpoint: str) -> str:
    """Our canonical layer name for a sparsify hookpoint or any module path ending in `layers.N[.module]`.

    model.layers.24 -> layers.24; layers.3.mlp -> layers.3.mlp; model.language_model.layers.3.self_attn ->
    layers.3.attn."""
    m = re.search(r"(?:^|\.)layers[._](\d+)(?:\.([A-Za-z_]+))?$", hookpoint)
    if m is None or (m.group(2) or "") not in SITE_OF_MODULE:
        raise ValueError(f"cannot tell the layer from the hookpoint {hookpoint!r}: expected a name ending in "
                         "layers.N, layers.N.mlp or layers.N.self_attn (e.g. model.layers.24)")
    return f"layers.{int(m.group(1))}{SITE_OF_MODULE[m.group(2) or '']}"


def hookpoint_for_layer(layer: str, prefix: str = MULTIMODAL_SAE_PREFIX) -> str:
    """The sparsify hookpoint (folder name) of a layer name or module path: layers.24 -> model.layers.24."""
    canonical = layer_for_hookpoint(layer)
    m = re.fullmatch(r"layers\.(\d+)(\.mlp|\.attn)?", canonical)
    return f"{prefix}layers.{m.group(1)}{MODULE_OF_SITE[m.group(2) or '']}"


def _canonical(layer: str | int) -> str | None:
    """Our name for a layer given as an index, a canonical name or a hookpoint; None if it names none."""
    if str(layer).lstrip("-").isdigit():
        return f"layers.{int(layer)}"
    try:
        return layer_for_hookpoint(str(layer))
    except ValueError:
        return None


def layer_index(layer: str) -> int:
    return int(re.search(r"layers\.(\d+)", layer).group(1))


# ---------------------------------------------------------------- detection


def _is_sparsify_folder(path: Path) -> bool:
    return (path / CFG_FILENAME).is_file() and (path / SPARSIFY_WEIGHTS).is_file()


def hookpoint_folders(path: str | Path) -> dict[str, Path]:
    """{hookpoint: folder} of a sparsify run directory, in natural order (layers.2 before layers.10)."""
    path = Path(path)
    found = [p for p in path.iterdir() if p.is_dir() and _is_sparsify_folder(p)] if path.is_dir() else []

    def natural(p: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]

    return {p.name: p for p in sorted(found, key=natural)}


def detect_sae_format(path: str | Path) -> str:
    """FORMAT_SAELENS, FORMAT_SPARSIFY or FORMAT_SPARSIFY_RUN for an SAE directory; ValueError if none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE at {path}: not a directory")
    if (path / CFG_FILENAME).is_file():
        if (path / WEIGHTS_FILENAME).is_file():
            return FORMAT_SAELENS
        if (path / SPARSIFY_WEIGHTS).is_file():
            return FORMAT_SPARSIFY
        raise ValueError(f"{path} has {CFG_FILENAME} but neither {WEIGHTS_FILENAME} (SAELens) nor "
                         f"{SPARSIFY_WEIGHTS} (sparsify): the weights file is missing")
    if hookpoint_folders(path):
        return FORMAT_SPARSIFY_RUN
    raise ValueError(f"no SAE at {path}: expected {CFG_FILENAME} with {WEIGHTS_FILENAME} (SAELens) or "
                     f"{SPARSIFY_WEIGHTS} (sparsify), or sparsify hookpoint folders such as model.layers.24/")


def select_hookpoint(run_dir: str | Path, layer: str | int | None = None) -> Path:
    """The hookpoint folder of a sparsify run directory for `layer` (24, "layers.24", "model.layers.24");
    with no layer, the only folder there is."""
    run_dir = Path(run_dir)
    folders = hookpoint_folders(run_dir)
    if not folders:
        raise ValueError(f"{run_dir} holds no sparsify hookpoint folders (a folder with cfg.json and "
                         f"{SPARSIFY_WEIGHTS})")
    names = ", ".join(folders)
    if layer is None:
        if len(folders) == 1:
            return next(iter(folders.values()))
        raise ValueError(f"{run_dir} holds SAEs for several hookpoints ({names}): name the layer")
    if str(layer) in folders:
        return folders[str(layer)]
    wanted = _canonical(layer)
    for name, folder in folders.items():
        if wanted is not None and _canonical(name) == wanted:
            return folder
    raise ValueError(f"{run_dir} has no SAE for layer {layer!r}; it holds {names}")


# ---------------------------------------------------------------- loading


@dataclass
class SparsifyLoadConfig:
    """How to read a sparsify folder (or a run directory of them) into our SAE."""

    path: str  # a hookpoint folder (cfg.json + sae.safetensors) or a directory of them
    layer: str | None = None  # which hookpoint of a run directory: 24, layers.24 or model.layers.24
    model_name: str | None = None  # the model it was trained on; else the run's config.json "model"
    device: str = "cpu"
    dtype: str | None = None  # default: the weights' dtype


def read_sparsify_cfg(folder: str | Path) -> dict[str, Any]:
    """cfg.json of a hookpoint folder, checked and completed with sparsify's defaults."""
    path = Path(folder) / CFG_FILENAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SparsifyFormatError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsifyFormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SparsifyFormatError(f"{path} must hold a JSON object with sparsify's SparseCoderConfig keys and d_in, "
                                  f"got a {type(raw).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise SparsifyFormatError(f"{path} lacks {', '.join(missing)} (a sparsify cfg.json has "
                                  f"{', '.join(CFG_KEYS)})")
    cfg = {**SPARSIFY_DEFAULTS, **raw}
    for key in ("d_in", "k", "num_latents", "expansion_factor"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key in ("d_in", "k") else 0):
            raise SparsifyFormatError(f"{path}: {key} must be a {'positive' if key in ('d_in', 'k') else 'non-negative'} "
                                      f"integer, got {v!r}")
    for key in ("normalize_decoder", "multi_topk", "skip_connection", "transcode"):
        if not isinstance(cfg[key], bool):
            raise SparsifyFormatError(f"{path}: {key} must be true or false, got {cfg[key]!r}")
    if cfg["activation"] != "topk":
        raise SparsifyFormatError(f"{path}: activation {cfg['activation']!r} is not supported (only topk; a groupmax "
                                  "SAE has no equivalent among our architectures)")
    if cfg["skip_connection"]:
        raise SparsifyFormatError(f"{path}: skip_connection=true (a W_skip term) is not supported")
    if cfg["transcode"]:
        raise SparsifyFormatError(f"{path}: this is a transcoder (transcode=true), which predicts another module's "
                                  "output; only sparse autoencoders are supported")
    cfg["num_latents"] = cfg["num_latents"] or cfg["d_in"] * cfg["expansion_factor"]
    if not cfg["k"] <= cfg["num_latents"]:
        raise SparsifyFormatError(f"{path}: k={cfg['k']} is larger than num_latents={cfg['num_latents']}")
    return cfg


def _run_model_name(run_dir: Path) -> str | None:
    path = run_dir / RUN_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    model = raw.get("model") if isinstance(raw, dict) else None
    return str(model) if isinstance(model, str) and model else None


def load_sparsify(cfg: SparsifyLoadConfig) -> SAE:
    """Our TopK SAE from a sparsify hookpoint folder (or one folder of a run directory)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(cfg.path)
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE at {path}: not a directory")
    folder = path if _is_sparsify_folder(path) else select_hookpoint(path, cfg.layer)
    if folder == path and cfg.layer is not None and _canonical(cfg.layer) != _canonical(folder.name):
        raise ValueError(f"{folder} is the SAE of hookpoint {folder.name}, not of layer {cfg.layer!r}")
    sp = read_sparsify_cfg(folder)
    wpath = folder / SPARSIFY_WEIGHTS
    try:
        weights = load_file(wpath)
    except (SafetensorError, OSError, ValueError) as e:
        raise SparsifyFormatError(f"{wpath} is not a readable safetensors file ({e})") from None
    d_in, n = sp["d_in"], sp["num_latents"]
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing or extra:
        raise SparsifyFormatError(f"{wpath}: tensors do not match a sparsify SAE (missing {sorted(missing)}, "
                                  f"unexpected {sorted(extra)}; expected {', '.join(TENSORS)})")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise SparsifyFormatError(f"{wpath}: {name} has shape {tuple(weights[name].shape)}, but "
                                      f"{folder / CFG_FILENAME} (d_in={d_in}, num_latents={n}) needs {shape}")
    dtypes = {str(t.dtype).replace("torch.", "") for t in weights.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise SparsifyFormatError(f"{wpath}: tensors must share one floating dtype of {', '.join(DTYPES)}, "
                                  f"got {sorted(dtypes)}")
    layer = None
    for name in dict.fromkeys((folder.name, folder.resolve().name)):  # RUN/sae may link to model.layers.24/
        try:
            layer = layer_for_hookpoint(name)
            break
        except ValueError:
            continue
    if layer is None:
        raise ValueError(f"{folder}: cannot tell the layer from the folder name {folder.name!r}: name the folder "
                         "after its hookpoint (e.g. model.layers.24), or link it under the run as RUN/sae "
                         "(ln -s .../model.layers.24 RUN/sae)")
    model_name = cfg.model_name or _run_model_name(folder.parent)
    dtype = cfg.dtype or next(iter(dtypes))
    sae_cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=n, k=sp["k"], apply_b_dec_to_input=True, normalize=False,
                        dtype=dtype, device=cfg.device, model_name=model_name, hook_name=layer,
                        hook_layer=layer_index(layer),
                        metadata={"source_format": FORMAT_SPARSIFY, "sparsify_hookpoint": folder.resolve().name,
                                  "sparsify_cfg": {k: sp[k] for k in CFG_KEYS}})
    sae = SAE(sae_cfg, init=False)
    target = {"device": sae_cfg.device, "dtype": DTYPES[dtype]}
    with torch.no_grad():
        # W_enc as the transpose of sparsify's [latents, d_in] encoder: the encoder matmul is the same call
        sae.W_enc.data = weights["encoder.weight"].to(**target).contiguous().t()
        sae.b_enc.data = weights["encoder.bias"].to(**target).contiguous()
        sae.W_dec.data = weights["W_dec"].to(**target).contiguous()
        sae.b_dec.data = weights["b_dec"].to(**target).contiguous()
    return sae


# ---------------------------------------------------------------- saving


@dataclass
class SparsifySaveConfig:
    """Where and how to write an SAE in sparsify's format."""

    out: str  # the run directory (hookpoint=True) or the folder itself
    hookpoint_folder: bool = True  # write OUT/<hookpoint>/ (the multimodal-sae layout) instead of OUT/ itself
    hookpoint: str | None = None  # folder name; default from the SAE's layer with `prefix`
    prefix: str = MULTIMODAL_SAE_PREFIX  # "model." gives model.layers.N; "" gives sparsify's layers.N for plain LMs
    model_name: str | None = None  # recorded in OUT/config.json as {"model": ...}; default the SAE's model_name


def sparsify_state(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(cfg.json, tensors) of a TopK SAE in sparsify's format (normalisation folded into the weights)."""
    if sae.cfg.arch != "topk":
        raise ValueError(f"sparsify's format holds TopK SAEs only; this SAE is {sae.cfg.arch!r}")
    w = sae.sae_lens_state()  # folded: raw activations in, raw activations out
    enc_w = w["W_enc"].t()
    b_enc = w["b_enc"]
    if not sae.cfg.apply_b_dec_to_input:  # sparsify always encodes x - b_dec: move b_dec into the encoder bias
        b_enc = b_enc + w["b_dec"] @ w["W_enc"]
    d_in, n = sae.cfg.d_in, sae.cfg.d_sae
    # sparsify keeps decoder rows at unit norm while it trains; a whitened SAE's folded rows are not (saes.sae)
    unit = bool(torch.allclose(w["W_dec"].float().norm(dim=1), torch.ones(n), atol=1e-4))
    cfg = {"activation": "topk", "expansion_factor": max(1, n // d_in), "normalize_decoder": unit, "num_latents": n,
           "k": int(sae.cfg.k), "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in}
    tensors = {"encoder.weight": enc_w, "encoder.bias": b_enc, "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    return cfg, {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_sparsify(sae: SAE, cfg: SparsifySaveConfig) -> Path:
    """Write the SAE as sparsify does (`SparseCoder.load_from_disk` reads it); returns the hookpoint folder."""
    from safetensors.torch import save_file

    from interp.infra.durable import publishing, write_json

    sp_cfg, tensors = sparsify_state(sae)
    out = Path(cfg.out)
    folder = out
    if cfg.hookpoint_folder:
        name = cfg.hookpoint
        if name is None:
            if not sae.cfg.hook_name:
                raise ValueError("the SAE does not record its layer (no hook_name): name the hookpoint folder")
            name = hookpoint_for_layer(sae.cfg.hook_name, cfg.prefix)
        folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for fname, write in ((SPARSIFY_WEIGHTS, lambda p: save_file(tensors, p)),
                         (CFG_FILENAME, lambda p: Path(p).write_text(json.dumps(sp_cfg)))):
        with publishing(folder / fname) as tmp:
            write(str(tmp))
    model = cfg.model_name or sae.cfg.model_name
    if cfg.hookpoint_folder and model:
        run_cfg = out / RUN_CONFIG
        existing = {}
        if run_cfg.exists():
            try:
                existing = json.loads(run_cfg.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{run_cfg} exists and is not JSON: write to another directory") from None
            if not isinstance(existing, dict) or existing.get("model", model) != model:
                raise ValueError(f"{run_cfg} records another model ({existing.get('model') if isinstance(existing, dict) else existing!r}); "
                                 f"write the SAE of {model} to another directory")
        hookpoints = sorted(set(existing.get("hookpoints", [])) | {folder.name})
        write_json(run_cfg, {**existing, "model": model, "hookpoints": hookpoints})
    return folder


# ---------------------------------------------------------------- any format


@dataclass
class SAELoadConfig:
    """An SAE directory in any supported format (ours/SAELens, a sparsify folder or run directory)."""

    path: str
    layer: str | None = None  # which hookpoint of a sparsify run directory
    model_name: str | None = None  # the model, where the directory does not record it
    device: str = "cpu"
    dtype: str | None = None


def load_sae(cfg: SAELoadConfig) -> SAE:
    """Load an SAE whatever its format (detect_sae_format); the one entry point commands can call."""
    fmt = detect_sae_format(cfg.path)
    if fmt == FORMAT_SAELENS:
        sae = SAE.load(cfg.path, device=cfg.device, dtype=cfg.dtype)
        if cfg.model_name and not sae.cfg.model_name:
            sae.cfg.model_name = cfg.model_name
        return sae
    return load_sparsify(SparsifyLoadConfig(path=str(cfg.path), layer=cfg.layer, model_name=cfg.model_name,
                                            device=cfg.device, dtype=cfg.dtype))


def sae_weights_file(path: str | Path, layer: str | None = None) -> Path:
    """The weights file of an SAE directory in any format (what a fingerprint should hash)."""
    path = Path(path)
    fmt = detect_sae_format(path)
    if fmt == FORMAT_SAELENS:
        return path / WEIGHTS_FILENAME
    folder = path if fmt == FORMAT_SPARSIFY else select_hookpoint(path, layer)
    return folder / SPARSIFY_WEIGHTS
