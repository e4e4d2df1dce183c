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

from interp.cache.data import DataError, Sample, fingerprint, open_source
from interp.cache.format import FORMAT, IDENTITY_ATTRS, SAMPLE_DTYPE, TOKEN_DTYPE, is_pad, role_codes
from interp.infra.cli_config import Command, at_least, check_bounds, choices, positional
from interp.infra.durable import publish, write_json
from interp.infra.identity import IdentityError, check_identity
from interp.infra.layout import RunLayout
from interp.model.inputs import DEFAULT_TEMPLATE, QA_TEMPLATE, check_template, model_inputs, prompts, user_text


@dataclass
class CacheConfig:
    """What `interp cache` caches, and where: one layer's activations of one model over one data source."""

    run: str | None = field(default=None, metadata=positional())
    """run directory; the cache is written to RUN/activations.h5"""
    model: str = "shapes-subject"
    """organism name, HF hub id, local path, or tl:NAME for TransformerLens"""
    layer: str = "4"
    """layer index (negative counts from the end) or name; see `interp layers`"""
    site: str = field(default="resid", metadata=choices(["resid", "attn", "mlp"]))
    """residual output, attention output or MLP output of the layer"""
    data: str = "shapes"
    """data source: shapes[:SPLIT][:qa] (qa: a question and its answer per scene; template "{image} {text}"),
    folder:PATH, hf:PATH[:IMAGE_COLUMN]"""
    samples: int | None = field(default=None, metadata=at_least(1))
    """number of samples to cache (none: the whole source; the shapes world: 2000)"""
    prompt_template: str = DEFAULT_TEMPLATE
    """prompt template with an {image} slot (and an optional {text} slot for the dataset's text)"""
    roles: tuple[str, ...] = ("image_patch",)
    """token roles to keep: image_patch, image_special, text, template, special, answer"""
    dtype: str = field(default="float16", metadata=choices(["float16", "float32"]))
    """storage dtype of the activations"""
    model_dtype: str = field(default="float32", metadata=choices(["float32", "float16", "bfloat16"]))
    """dtype the model runs in"""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N"""
    revision: str | None = None
    """hub revision of the model"""
    batch_size: int = field(default=16, metadata=at_least(1))
    """samples per forward pass"""
    part_samples: int = field(default=256, metadata=at_least(1))
    """samples per crash-safe part file"""
    engine: str = field(default="nnsight", metadata=choices(["nnsight", "torch"]))
    """hooking engine"""
    strict: bool = False
    """stop at the first unreadable image instead of skipping it"""
    seed: int = 0
    """seed recorded with the cache (and of the shapes source)"""

    def __post_init__(self) -> None:
        self.roles = tuple(self.roles)
        check_bounds(self)

    def same_cache(self, other: CacheConfig) -> bool:
        """Whether two configs make the same cache (wherever it is written)."""
        return {**asdict(self), "run": None} == {**asdict(other), "run": None}


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
        self.role_codes = role_codes(cfg.roles)
        self.lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype, revision=cfg.revision)
        layer = int(cfg.layer) if str(cfg.layer).lstrip("-").isdigit() else cfg.layer
        self.hook = resolve_layer(self.lm, layer, cfg.site)
        check_template(cfg.prompt_template, self.lm.is_multimodal)

    def run_batch(self, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Activations [rows, d] and token table [rows] of the kept roles (sample-major, `sample` the
        batch-local index), and each sample's number of non-padding tokens."""
        from interp.model.hooks import capture
        from interp.model.token_map import token_table

        answers = [s.answer for s in samples] if any(s.answer for s in samples) else None
        texts, users = prompts(self.lm, samples, self.cfg.prompt_template, answers)
        inputs = model_inputs(self.lm, samples, texts)
        acts = capture(self.lm.model, inputs, self.hook.module_path, self.cfg.engine)
        enc = inputs if self.lm.kind != "hooked-transformer" else {"input_ids": inputs["input"]}
        table = token_table(self.lm, enc, [[s.image] for s in samples] if self.lm.is_multimodal else None, users,
                            answers)
        n_tokens = np.bincount(table["sample"][~is_pad(table["role"])], minlength=len(samples))
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


def build_cache(cfg: CacheConfig, writer: CacheWriter | None = None) -> Path:
    """Write (or finish writing) the cache of `cfg.run`; returns its path. Pass a `writer` built from
    the same config (any run) to reuse its loaded model."""
    from interp.infra.runinfo import versions

    layout = RunLayout.of(cfg.run)
    out = layout.cache
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    if writer is not None and not writer.cfg.same_cache(cfg):
        raise ValueError("the writer was built from another cache config")
    writer = writer or CacheWriter(cfg)
    source = open_source(cfg.data, cfg.samples, cfg.seed)
    if getattr(source, "qa", False) and "{text}" not in cfg.prompt_template:
        raise DataError(f"the data source {cfg.data} gives each scene a question, which the prompt template "
                        f"{cfg.prompt_template!r} has no {{text}} slot for: use --prompt-template '{QA_TEMPLATE}'")
    identity = writer.identity(source)
    identity_json = {k: json.dumps(identity[k], sort_keys=True) for k in IDENTITY_ATTRS}
    if out.exists():
        _check_finished(out, identity_json)
        print(f"{out} is already complete")
        return out
    parts_dir = layout.cache_parts
    fresh = [d for d in (layout.root, parts_dir) if not d.exists()]  # what this run creates
    try:
        _write_parts(writer, source, cfg, parts_dir, identity_json, rank, world)
    except (ValueError, FileNotFoundError, KeyError):  # bad input: leave nothing behind that this run began
        if world == 1 and parts_dir in fresh:
            shutil.rmtree(parts_dir, ignore_errors=True)
            if layout.root in fresh and not any(layout.root.iterdir()):
                layout.root.rmdir()
        raise
    if world > 1:
        _wait_for_parts(parts_dir, _part_count(len(source), cfg.part_samples), world)
    if rank == 0:
        attrs = {**identity_json, "format": FORMAT, "family": writer.lm.family, "kind": writer.lm.kind,
                 "d": 0, "data_fingerprint": fingerprint(source), "engine": cfg.engine,
                 "processor": json.dumps(_processor_settings(writer.lm), sort_keys=True, default=str),
                 "versions": json.dumps(versions()), "config": json.dumps({**asdict(cfg), "run": None}, default=str),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _merge(parts_dir, _part_count(len(source), cfg.part_samples), out, attrs)
    if world > 1:
        torch.distributed.barrier()
    return out


def _part_count(n_samples: int, part_samples: int) -> int:
    return -(-n_samples // part_samples)


def _write_parts(writer: CacheWriter, source, cfg: CacheConfig, parts_dir: Path, identity_json: dict, rank: int,
                 world: int) -> None:
    """This rank's part files that are not written yet (the manifest first, checked on a resume)."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest = parts_dir / "manifest.json"
    if rank == 0 and not manifest.exists():
        write_json(manifest, identity_json, sort_keys=True)
    elif manifest.exists():
        check_identity(json.loads(manifest.read_text()), identity_json, f"the partial cache in {parts_dir}",
                       f"use another run directory or delete {parts_dir}")
    total = _part_count(len(source), cfg.part_samples)
    if total == 0:
        raise DataError(f"data source {cfg.data} is empty")
    todo = [p for p in range(rank, total, world) if not _part_path(parts_dir, p).exists()]
    n_todo = sum(min(cfg.part_samples, len(source) - p * cfg.part_samples) for p in todo)
    with tqdm(total=n_todo, desc=f"cache {cfg.model} {writer.hook.name}" + (f" rank {rank}" if world > 1 else ""),
              unit="sample", mininterval=1) as bar:
        for p in todo:
            _write_part(writer, source, p, parts_dir, bar)


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
            table["sample"] += len(samples)  # the part's samples-table row (the merge adds the part's offset)
            acts.append(rows)
            tokens.append(table)
            for g, nt, nr in zip(good, n_tokens, n_rows):
                samples.append((g.index, g.image_ref, g.image_hash, user_text(cfg.prompt_template, g),
                                g.image.width if g.image else 0, g.image.height if g.image else 0, int(nt), 0, int(nr)))
        bar.update(len(batch))
    tmp = parts_dir / f"part-{p:06d}.h5.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("activations", data=np.concatenate(acts).astype(cfg.dtype) if acts else np.zeros((0, 0), cfg.dtype))
        f.create_dataset("tokens", data=np.concatenate(tokens) if tokens else np.zeros(0, TOKEN_DTYPE))
        f.create_dataset("samples", data=np.array(samples, dtype=SAMPLE_DTYPE))
        f.attrs["skipped"] = json.dumps(skipped)
    publish(tmp, _part_path(parts_dir, p))


def _merge(parts_dir: Path, n_parts: int, out: Path, attrs: dict) -> None:
    """Concatenate the parts in order into `out` (written to a temp name, fsynced, then renamed)."""
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
                t["sample"] += s
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
    publish(tmp, out)
    shutil.rmtree(parts_dir)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['image_ref']}: {skipped[0]['error']}")


def _check_finished(out: Path, identity_json: dict) -> None:
    try:
        with h5py.File(out, "r") as f:
            theirs = {k: f.attrs.get(k) for k in IDENTITY_ATTRS}
    except OSError as e:
        raise IdentityError(f"{out} exists but is not a readable HDF5 file ({e}): delete it to rebuild") from None
    theirs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in theirs.items()}
    check_identity(theirs, identity_json, f"the cache {out}", "use another run directory")


def _processor_settings(lm) -> dict:
    proc = lm.processor
    if proc is None:
        return {"tokenizer": type(lm.tokenizer).__name__, "padding_side": getattr(lm.tokenizer, "padding_side", None)}
    ip = getattr(proc, "image_processor", None)
    return {"processor": type(proc).__name__, "image_processor": ip.to_dict() if ip is not None else None,
            "padding_side": getattr(lm.tokenizer, "padding_side", None)}


def _report(out: Path, cfg: CacheConfig) -> None:
    if _dist()[0] == 0:
        from interp.cache.reader import ActivationReader

        with ActivationReader(out) as r:
            print(f"{out}: {r.n_rows} rows x {r.d} from {r.n_samples} samples")


COMMANDS = [Command("cache", CacheConfig, build_cache, "cache one layer's activations over a data source to HDF5",
                    "Resumable: re-run with the same arguments after a crash or kill to finish. Under "
                    "`torchrun --nproc_per_node N -m interp.cli cache ...` the data is split across ranks.", _report)]
