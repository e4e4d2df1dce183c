"""SAE architectures behind a registry, one module each (as SAELens registers its SAE classes).

Each module defines one `Architecture`: its activation, its training loss, its dead-feature
handling and its mapping to and from SAELens's on-disk format, and registers it. Everything else
(the SAE class, the trainer, the CLI's choices, the benchmark) asks the registry, so adding an
architecture is adding a module here and naming it in `_MODULES`.
"""

from __future__ import annotations

import importlib

from saes.architectures.base import REGISTRY, Architecture, UnknownArchitectureError

_MODULES = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu")  # also the order SAELens exports are matched in
for _name in _MODULES:
    importlib.import_module(f"saes.architectures.{_name}")


def get(name: str) -> Architecture:
    if name not in REGISTRY:
        raise UnknownArchitectureError(f"unknown SAE architecture {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names() -> list[str]:
    return list(REGISTRY)


def for_sae_lens(architecture: str, metadata: dict) -> Architecture | None:
    """The architecture that reads a SAELens cfg.json's `architecture` (and training metadata)."""
    return next((a for a in REGISTRY.values() if a.reads_sae_lens(architecture, metadata)), None)
