"""Load any supported model by name into one handle: HF image-text-to-text, HF causal LM, TransformerLens.

Everything downstream (layer addressing, hooks, the activation cache, token tables) takes a
`LoadedModel`, so it never has to care where the model came from: a shipped organism, a
local `save_pretrained` directory, a hub id, or `tl:<name>` for TransformerLens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interp.shapes.organisms import ORGANISMS, is_organism, organism_path

KINDS = ("image-text-to-text", "causal-lm", "hooked-transformer")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HOOKED_PREFIX = "tl:"


class ModelNotFoundError(ValueError):
    """A model name that is neither a local directory, a shipped organism, nor a reachable hub id."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # HF model or transformer_lens.HookedTransformer
    processor: Any | None  # AutoProcessor for image-text-to-text models, else None
    tokenizer: Any  # always set
    name: str  # as the user gave it
    path: str  # resolved local path (or the name for hooked models)
    kind: str  # one of KINDS
    family: str  # config.model_type ("llava", "qwen2_vl", "llama", ...); "hooked" for TransformerLens
    revision: str | None
    device: torch.device
    dtype: torch.dtype

    @property
    def is_multimodal(self) -> bool:
        return self.kind == "image-text-to-text"


def resolve_device(device: str = "auto") -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def without_video(processor_class: type) -> type:
    """`processor_class` without its video slot (same name, so it saves and reloads as the original).

    LLaVA-OneVision, Qwen2(.5)-VL and SmolVLM processors refuse to build without a video
    processor, and video processors need torchvision, which must never be installed next to
    the CPU torch. Images do not need it.
    """
    attrs = [a for a in processor_class.get_attributes() if a != "video_processor"]
    return type(processor_class.__name__, (processor_class,),
                {"get_attributes": classmethod(lambda cls: list(attrs)), "__module__": processor_class.__module__})


def load_processor(path: str, model_type: str, revision: str | None = None):
    """AutoProcessor, or the saved processor class `without_video` where torchvision is missing."""
    import transformers
    from transformers import AutoProcessor, ProcessorMixin
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        saved = ProcessorMixin.get_processor_dict(path, revision=revision)[0].get("processor_class")
        cls = getattr(transformers, saved or PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
        if cls is not None and "video_processor" in cls.get_attributes():
            return without_video(cls).from_pretrained(path, revision=revision, video_processor=None)
    return AutoProcessor.from_pretrained(path, revision=revision)


def model_kind(config) -> str:
    """The kind of model a config describes, as the Auto classes map its model type."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "image-text-to-text"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    raise ValueError(f"model type {config.model_type!r} is neither an image-text-to-text model nor a causal LM "
                     "in this transformers version; lmmscope cannot hook it")


def _not_found(name: str, error: Exception | str) -> ModelNotFoundError:
    """The error to raise instead of the hub's or TransformerLens's (multi-line, or a list of every model)."""
    reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    reason = reason if len(reason) <= 200 else reason[:200] + "…"
    return ModelNotFoundError(
        f"cannot load model {name!r}: {reason}. Give a directory written by save_pretrained, a Hugging Face hub "
        f"id (needs the network or a cached copy), 'tl:<name>' for a TransformerLens model, or a shipped "
        f"organism: {', '.join(ORGANISMS)}")


def resolve_path(name: str, revision: str | None = None) -> tuple[str, str]:
    """(what to pass to from_pretrained, the local directory it resolves to)."""
    if is_organism(name):
        path = str(organism_path(name))
        return path, path
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise _not_found(name, "the directory has no config.json")
        return name, str(Path(name).resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise _not_found(name, "no such directory")
    from transformers.utils import cached_file

    try:
        config_file = cached_file(name, "config.json", revision=revision)
    except Exception as e:  # invalid ids, missing repos, no network: all mean "not found here"
        raise _not_found(name, e) from None
    return name, str(Path(config_file).parent)


def load_model(name_or_path: str, *, device: str = "auto", dtype: str = "float32", revision: str | None = None,
               kind: str = "auto") -> LoadedModel:
    """Load a model, its processor and tokenizer; `kind="auto"` decides from the config."""
    if kind not in ("auto", *KINDS):
        raise ValueError(f"unknown kind {kind!r}; use auto or one of {', '.join(KINDS)}")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if name_or_path.startswith(HOOKED_PREFIX) or kind == "hooked-transformer":
        if revision is not None:
            raise ValueError("TransformerLens models are loaded by name only: drop revision for 'tl:' models")
        return _load_hooked(name_or_path, dev, dt)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    source, path = resolve_path(name_or_path, revision)
    config = AutoConfig.from_pretrained(source, revision=revision)
    kind = model_kind(config) if kind == "auto" else kind
    if kind == "image-text-to-text":
        model = AutoModelForImageTextToText.from_pretrained(source, revision=revision, dtype=dt)
        processor = load_processor(source, config.model_type, revision)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dt)
        processor, tokenizer = None, AutoTokenizer.from_pretrained(source, revision=revision)
    model = model.to(dev).eval()
    return LoadedModel(model, processor, tokenizer, name_or_path, path, kind, config.model_type, revision, dev, dt)


def _load_hooked(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformer_lens import HookedTransformer

    tl_name = name.removeprefix(HOOKED_PREFIX)
    try:
        model = HookedTransformer.from_pretrained(tl_name, device=str(device), dtype=dtype)
    except (OSError, ValueError) as e:
        raise _not_found(name, e) from None
    return LoadedModel(model.eval(), None, model.tokenizer, name, tl_name, "hooked-transformer", "hooked", None,
                       device, dtype)


def wrap_model(model: torch.nn.Module, processor_or_tokenizer: Any = None, name: str = "custom") -> LoadedModel:
    """A `LoadedModel` around a model built in code (e.g. a HookedTransformer from a HookedTransformerConfig)."""
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    processor = processor_or_tokenizer if tokenizer is not processor_or_tokenizer else None
    if type(model).__module__.startswith("transformer_lens"):
        kind, family = "hooked-transformer", "hooked"
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    elif hasattr(getattr(model, "config", None), "model_type"):
        kind, family = model_kind(model.config), model.config.model_type
    else:
        raise ValueError(f"wrap_model({name!r}): {type(model).__name__} is neither a transformers model "
                         "nor a TransformerLens HookedTransformer")
    if tokenizer is None:
        raise ValueError(f"wrap_model({name!r}) needs a tokenizer or processor: the model carries none")
    if kind == "image-text-to-text" and processor is None:
        raise ValueError(f"wrap_model({name!r}): a {family} model needs its processor, not only a tokenizer")
    param = next(model.parameters())
    return LoadedModel(model.eval(), processor, tokenizer, name, name, kind, family, None, param.device, param.dtype)
