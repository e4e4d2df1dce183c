"""`interp cache`: run a model over data and write one layer's activations to HDF5.

Crash safety comes from the layout, not from HDF5 (a killed HDF5 writer can corrupt the
whole file): samples are processed in fixed parts, each part is written to its own file
and renamed into place only when complete, and the final file is merged from the parts
and renamed into place too. A re-run with the same arguments skips the finished parts, so
a kill -9 at any point loses at most the part in progress and never duplicates a row.
Under torchrun, rank r takes parts r, r + world, ...; rank 0 merges them in order, so the
rows are the same as with one process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from interp.cache.format import FORMAT, IDENTITY_ATTRS, SAMPLE_DTYPE
from interp.cache.data import DEFAULT_TEMPLATE, DataError, Sample, check_template, fingerprint, open_source, user_text
from interp.model.inputs import model_inputs, prompts


class CacheMismatchError(ValueError):
    pass


@dataclass
class CacheConfig:
    model: str = "shapes-subject"
    layer: str = "2"  # index or name; see `interp layers MODEL`
    site: str = "resid"
    data: str = "shapes"
    n: int | None = None  # samples to cache (None: the whole source; shapes: 2000)
    prompt_template: str = DEFAULT_TEMPLATE
    roles: tuple[str, ...] = ("image_patch",)
    dtype: str = "float16"  # storage dtype of the activations
    model_dtype: str = "float32"
    device: str = "auto"
    revision: str | None = None
    batch_size: int = 16
    part_samples: int = 256
    engine: str = "nnsight"
    strict: bool = False  # a bad image stops the run instead of being skipped
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _wait_for_parts(parts_dir: Path, n_parts: int, world: int) -> None:
    if world > 1 and torch.distributed.is_available():
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()
    missing = [p for p in range(n_parts) if not _part_path(parts_dir, p).exists()]
    if missing:
        raise RuntimeError(f"parts {missing[:5]} are missing after all ranks finished")


def _part_path(parts_dir: Path, p: int) -> Path:
    return parts_dir / f"part-{p:06d}.h5"


class CacheWriter:
    """Holds the model and turns samples into activation rows, token rows and sample rows."""

    def __init__(self, cfg: CacheConfig, lm=None):
        """`lm`: an already loaded model (e.g. `interp.model.models.wrap_model` of a model built in code),
        used instead of loading `cfg.model`; the cache still records `cfg.model` as its name."""
        from interp.model.layers import resolve_layer
        from interp.model.models import load_model

        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype, revision=cfg.revision)
        layer = int(cfg.layer) if str(cfg.layer).lstrip("-").isdigit() else cfg.layer
        self.hook = resolve_layer(self.lm, layer, cfg.site)
        check_template(cfg.prompt_template, self.lm.is_multimodal)
        from interp.model.token_map import ROLES

        unknown = set(cfg.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {list(ROLES)}")
        self.role_codes = [ROLES.index(r) for r in cfg.roles]

    def run_batch(self, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Activations [rows, d] and token table [rows] of the kept roles (sample-major, batch-local
        sample numbers), and each sample's number of non-padding tokens."""
        from interp.model.hooks import capture
        from interp.model.token_map import ROLES, token_table

        texts, users = prompts(self.lm, samples, self.cfg.prompt_template)
        inputs = model_inputs(self.lm, samples, texts)
        acts = capture(self.lm.model, inputs, self.hook.module_path, self.cfg.engine)
        enc = inputs if self.lm.kind != "hooked-transformer" else {"input_ids": inputs["input"]}
        table = token_table(self.lm, enc, [[s.image] for s in samples] if self.lm.is_multimodal else None, users)
        n_tokens = np.bincount(table["sample"][table["role"] != ROLES.index("pad")], minlength=len(samples))
        table = table[np.isin(table["role"], self.role_codes)]
        flat = acts.float().cpu().reshape(-1, acts.shape[-1]).numpy()
        rows = flat[table["sample"].astype(np.int64) * acts.shape[1] + table["position"]]
        return rows, table, n_tokens

    def identity(self, source) -> dict:
        return {
            "model": self.cfg.model, "revision": self.cfg.revision or "", "layer": self.hook.name,
            "site": self.hook.site, "module_path": self.hook.module_path, "dtype": self.cfg.dtype,
            "roles": list(self.cfg.roles), "data": source.describe(), "prompt_template": self.cfg.prompt_template,
            "seed": self.cfg.seed,
        }


def build_cache(cfg: CacheConfig, out: str | Path, writer: CacheWriter | None = None) -> Path:
    """Write (or finish writing) the cache at `out`; returns its path. Pass a `writer` built from
    the same config to reuse its loaded model."""
    from interp.infra.runinfo import versions

    out = Path(out)
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    if writer is not None and writer.cfg != cfg:
        raise ValueError("the writer was built from another cache config")
    writer = writer or CacheWriter(cfg)
    source = open_source(cfg.data, cfg.n, cfg.seed)
    identity = writer.identity(source)
    identity_json = {k: json.dumps(identity[k], sort_keys=True) for k in IDENTITY_ATTRS}
    if out.exists():
        _check_identity(out, identity_json)
        print(f"{out} is already complete")
        return out
    parts_dir = out.with_name(out.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest = parts_dir / "manifest.json"
    if rank == 0 and not manifest.exists():
        manifest.write_text(json.dumps(identity_json, sort_keys=True))
    elif manifest.exists() and json.loads(manifest.read_text()) != identity_json:
        theirs = json.loads(manifest.read_text())
        diff = {k: (theirs.get(k), v) for k, v in identity_json.items() if theirs.get(k) != v}
        raise CacheMismatchError(f"{parts_dir} holds a partial cache made with other settings {diff} (then, now): "
                                 f"use another --out or delete {parts_dir}")
    n_parts = -(-len(source) // cfg.part_samples)
    if n_parts == 0:
        raise DataError(f"data source {cfg.data} is empty")
    todo = [p for p in range(rank, n_parts, world) if not _part_path(parts_dir, p).exists()]
    n_todo = sum(min(cfg.part_samples, len(source) - p * cfg.part_samples) for p in todo)
    bar = tqdm(total=n_todo, desc=f"cache {cfg.model} {writer.hook.name}" + (f" rank {rank}" if world > 1 else ""),
               unit="sample", mininterval=1)
    for p in todo:
        _write_part(writer, source, p, parts_dir, bar)
    bar.close()
    if world > 1:
        _wait_for_parts(parts_dir, n_parts, world)
    if rank == 0:
        attrs = {**identity_json, "format": FORMAT, "family": writer.lm.family, "kind": writer.lm.kind,
                 "d": 0, "data_fingerprint": fingerprint(source), "engine": cfg.engine,
                 "processor": json.dumps(_processor_settings(writer.lm), sort_keys=True, default=str),
                 "versions": json.dumps(versions()), "config": json.dumps(asdict(cfg), default=str),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _merge(parts_dir, n_parts, out, attrs)
    if world > 1:
        torch.distributed.barrier()
    return out


def _write_part(writer: CacheWriter, source, p: int, parts_dir: Path, bar) -> None:
    cfg = writer.cfg
    idx = range(p * cfg.part_samples, min((p + 1) * cfg.part_samples, len(source)))
    acts, tokens, samples, skipped = [], [], [], []
    for s in range(0, len(idx), cfg.batch_size):
        batch = [source[i] for i in idx[s: s + cfg.batch_size]]
        good = []
        for b in batch:
            if b.error:
                if cfg.strict:
                    raise DataError(f"cannot read image {b.image_ref}: {b.error} (drop --strict to skip such images)")
                skipped.append({"image_ref": b.image_ref, "error": b.error})
            else:
                good.append(b)
        if good:
            rows, table, n_tokens = writer.run_batch(good)
            n_rows = np.bincount(table["sample"], minlength=len(good))
            table["sample"] = np.asarray([g.index for g in good])[table["sample"]]
            acts.append(rows)
            tokens.append(table)
            for g, nt, nr in zip(good, n_tokens, n_rows):
                samples.append((g.index, g.image_ref, g.image_hash, user_text(cfg.prompt_template, g),
                                g.image.width if g.image else 0, g.image.height if g.image else 0, int(nt), 0, int(nr)))
        bar.update(len(batch))
    from interp.model.token_map import TOKEN_DTYPE

    tmp = parts_dir / f"part-{p:06d}.h5.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("activations", data=np.concatenate(acts).astype(cfg.dtype) if acts else np.zeros((0, 0), cfg.dtype))
        f.create_dataset("tokens", data=np.concatenate(tokens) if tokens else np.zeros(0, TOKEN_DTYPE))
        f.create_dataset("samples", data=np.array(samples, dtype=SAMPLE_DTYPE))
        f.attrs["skipped"] = json.dumps(skipped)
    os.replace(tmp, _part_path(parts_dir, p))


def _merge(parts_dir: Path, n_parts: int, out: Path, attrs: dict) -> None:
    """Concatenate the parts in order into `out` (written to a temp name, then renamed)."""
    from interp.model.token_map import TOKEN_DTYPE

    paths = [_part_path(parts_dir, p) for p in range(n_parts)]
    n_rows, n_samples, d, skipped = 0, 0, 0, []
    for path in paths:
        with h5py.File(path, "r") as f:
            n_rows += f["activations"].shape[0]
            n_samples += f["samples"].shape[0]
            d = max(d, f["activations"].shape[1])
            skipped += json.loads(f.attrs["skipped"])
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as g:
        dtype = json.loads(attrs["dtype"])
        acts = g.create_dataset("activations", (n_rows, d), dtype=dtype, chunks=(min(max(n_rows, 1), 4096), d) if n_rows else None)
        toks = g.create_dataset("tokens", (n_rows,), dtype=TOKEN_DTYPE)
        samp = g.create_dataset("samples", (n_samples,), dtype=SAMPLE_DTYPE)
        r = s = 0
        for path in paths:
            with h5py.File(path, "r") as f:
                a, t, sm = f["activations"][:], f["tokens"][:], f["samples"][:]
            if len(a):
                acts[r: r + len(a)] = a
                toks[r: r + len(t)] = t
            sm["row_start"] = r + np.cumsum(sm["n_rows"]) - sm["n_rows"]  # rows are sample-major within a part
            samp[s: s + len(sm)] = sm
            r += len(a)
            s += len(sm)
        for k, v in attrs.items():
            g.attrs[k] = v
        g.attrs["d"] = d
        g.attrs["n_rows"] = n_rows
        g.attrs["n_samples"] = n_samples
        g.attrs["skipped"] = json.dumps(skipped)
    os.replace(tmp, out)
    shutil.rmtree(parts_dir)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['image_ref']}: {skipped[0]['error']}")


def _check_identity(out: Path, identity_json: dict) -> None:
    try:
        with h5py.File(out, "r") as f:
            theirs = {k: f.attrs.get(k) for k in IDENTITY_ATTRS}
    except OSError as e:
        raise CacheMismatchError(f"{out} exists but is not a readable HDF5 file ({e}): delete it to rebuild") from None
    theirs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in theirs.items()}
    diff = {k: (theirs.get(k), v) for k, v in identity_json.items() if theirs.get(k) != v}
    if diff:
        raise CacheMismatchError(f"{out} was made with other settings {diff} (file, now): use another --out")


def _processor_settings(lm) -> dict:
    proc = lm.processor
    if proc is None:
        return {"tokenizer": type(lm.tokenizer).__name__, "padding_side": getattr(lm.tokenizer, "padding_side", None)}
    ip = getattr(proc, "image_processor", None)
    return {"processor": type(proc).__name__, "image_processor": ip.to_dict() if ip is not None else None,
            "padding_side": getattr(lm.tokenizer, "padding_side", None)}


def register(sub) -> None:
    import argparse

    d = CacheConfig()
    p = sub.add_parser("cache", help="cache one layer's activations over a data source to HDF5",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Resumable: re-run with the same arguments after a crash or kill to finish. "
                                   "Under `torchrun --nproc_per_node N` the data is split across ranks.")
    p.add_argument("--model", default=d.model, help="organism name, HF hub id, local path, or tl:NAME for TransformerLens")
    p.add_argument("--layer", default=d.layer, help="layer index (negative counts from the end) or name; see `interp layers`")
    p.add_argument("--site", default=d.site, choices=["resid", "attn", "mlp"], help="residual output, attention or MLP output")
    p.add_argument("--data", default=d.data, help="shapes[:SPLIT], folder:PATH, hf:PATH[:IMAGE_COLUMN]")
    # not --n: under torchrun, argparse would read it as an abbreviation of torchrun's --nnodes
    p.add_argument("--samples", type=int, default=None, help="number of samples (default: all; 2000 for shapes)")
    p.add_argument("--prompt", default=d.prompt_template, help="prompt template with an {image} slot (and optional {text})")
    p.add_argument("--roles", default=",".join(d.roles),
                   help="token roles to keep: image_patch,image_special,text,template,special (comma separated)")
    p.add_argument("--dtype", default=d.dtype, choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--model-dtype", default=d.model_dtype, choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--revision", default=None, help="hub revision of the model")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per forward pass")
    p.add_argument("--part-samples", type=int, default=d.part_samples, help="samples per crash-safe part file")
    p.add_argument("--engine", default=d.engine, choices=["nnsight", "torch"], help="hooking engine")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--seed", type=int, default=d.seed, help="seed recorded with the cache (and of the shapes source)")
    p.add_argument("--out", required=True, help="output .h5 file")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = CacheConfig(model=args.model, layer=args.layer, site=args.site, data=args.data, n=args.samples,
                      prompt_template=args.prompt, roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()),
                      dtype=args.dtype, model_dtype=args.model_dtype, device=args.device, revision=args.revision,
                      batch_size=args.batch_size, part_samples=args.part_samples, engine=args.engine,
                      strict=args.strict, seed=args.seed)
    out = build_cache(cfg, args.out)
    if _dist()[0] == 0:
        from interp.cache.reader import ActivationReader

        with ActivationReader(out) as r:
            print(f"{out}: {r.n_rows} rows x {r.d} from {len(r.samples)} samples")
    return 0
