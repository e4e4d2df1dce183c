"""Checkpoints as safetensors + JSON: model, optimizer and RNG state, never a pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from interp.infra.durable import publish


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    meta: dict) -> None:
    """Write atomically (temp dir, then rename) so a kill never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"meta": meta, "optimizer": opt_meta}))
    old = path.with_name(path.name + ".old")
    _rmtree(old)
    if path.exists():
        os.replace(path, old)
    publish(tmp, path)  # fsynced first; a kill between the two renames leaves .old, which find_checkpoint takes
    _rmtree(old)


def find_checkpoint(path: str | Path) -> Path | None:
    """The complete checkpoint at `path`, or the previous one if a kill interrupted the swap."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".old")):
        if (p / "state.json").exists():
            return p
    return None


def load_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """Returns (model_state, meta); loads the optimizer state in place when given."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    return load_file(path / "model.safetensors"), state["meta"]


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
