"""The shapes-world model organisms shipped with lmmscope, addressable by name."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
ORGANISMS = {"shapes-subject": "subject", "shapes-explainer": "explainer"}


class UnknownOrganismError(ValueError):
    pass


def is_organism(name: str) -> bool:
    return str(name).startswith("shapes-") and not Path(str(name)).exists()


def organism_path(name: str) -> Path:
    """Directory of a shipped organism, loadable by any `from_pretrained`."""
    if name not in ORGANISMS:
        raise UnknownOrganismError(f"unknown organism {name!r}; known organisms: {', '.join(ORGANISMS)}")
    path = WEIGHTS / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"organism {name!r} has no weights at {path}: train them with "
                                f"`interp organism train --which {ORGANISMS[name]}` or restore the repository's files")
    return path


def organism_world(path: str | Path):
    """The world an organism directory was trained on (its training.json), else the default world."""
    import json

    from interp.shapes.world import WorldConfig

    meta = Path(path) / "training.json"
    world = json.loads(meta.read_text()).get("world") if meta.exists() else None
    return WorldConfig.from_json(world) if world else WorldConfig()


def load_organism(name: str, device: str = "cpu"):
    """(model, processor) of a shipped organism, through the Auto classes like any hub model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = organism_path(name)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="float32").to(device).eval()
    return model, AutoProcessor.from_pretrained(path)
