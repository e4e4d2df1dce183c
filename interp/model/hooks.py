"""Read a layer's activations during a forward pass: nnsight tracing, or plain torch hooks.

Both engines address the layer by its dotted module path (a HookPoint from interp.model.layers),
which also covers TransformerLens models, whose hook points are modules too. Capturing
stops the forward right after the layer: nothing past it is needed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch

ENGINES = ("nnsight", "torch")
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Stop(Exception):
    pass


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _call(model, inputs: Mapping) -> None:
    if "input" in inputs:  # TransformerLens takes a token tensor positionally
        model(inputs["input"], **{k: v for k, v in inputs.items() if k != "input"})
    else:
        model(**inputs)


def nnsight_model(model: torch.nn.Module):
    """One nnsight wrapper per model, built on first use."""
    from nnsight import NNsight

    if model not in _WRAPPERS:
        _WRAPPERS[model] = NNsight(model)
    return _WRAPPERS[model]


@torch.no_grad()
def capture(model: torch.nn.Module, inputs: Mapping, module_path: str, engine: str = "nnsight") -> torch.Tensor:
    """The output of `module_path` ([batch, seq, d]) for one forward pass on `inputs`."""
    if engine == "nnsight":
        wrapped = nnsight_model(model)
        args = (inputs["input"],) if "input" in inputs else ()
        kwargs = {k: v for k, v in inputs.items() if k != "input"}
        with wrapped.trace(*args, **kwargs) as tracer:
            saved = wrapped.get(module_path).output.save()
            tracer.stop()
        return _first(saved)
    if engine == "torch":
        box = []

        def hook(_module, _inp, output):
            box.append(_first(output))
            raise _Stop

        handle = model.get_submodule(module_path).register_forward_hook(hook)
        try:
            _call(model, inputs)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not box:
            raise RuntimeError(f"module {module_path} did not run in the forward pass")
        return box[0]
    raise ValueError(f"unknown hook engine {engine!r}; choose one of {ENGINES}")


@contextmanager
def patch_output(model: torch.nn.Module, module_path: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, every forward of `module_path` returns fn(its output) instead.

    A plain forward hook, so it holds across `generate`'s many forwards (each call sees that
    step's slice of the sequence: the prompt first, then one token at a time)."""

    def hook(_module, _inp, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = model.get_submodule(module_path).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
