"""Which latent stands for which shapes-world concept: saes.recovery's matches for an SAE.

Read from the SAE's `recovery.json` (what `interp recovery` writes by default) when present,
else computed with `saes.recovery.recover_concepts` on an activation cache (the one given,
or the one recorded in the SAE's metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Match:
    concept: str
    latent: int
    f1: float


def concept_matches(sae_dir: str | Path, cache: str | Path | None = None) -> list[Match]:
    """The best latent for each concept (every concept, whatever its F1; the F1 says how good)."""
    report = Path(sae_dir) / "recovery.json"
    if report.exists() and cache is None:
        concepts = json.loads(report.read_text())["concepts"]
    else:
        concepts = _recover(sae_dir, cache)
    return [Match(c["concept"], int(c["latent"]), float(c["f1"])) for c in concepts]


def _recover(sae_dir: str | Path, cache: str | Path | None) -> list[dict]:
    from dataclasses import asdict

    import torch

    from interp.cache.reader import ActivationReader
    from saes.recovery import recover_concepts
    from saes.sae import SAE

    sae = SAE.load(sae_dir)
    cache = cache or (sae.cfg.metadata or {}).get("activation_cache")
    if not cache or not Path(cache).exists():
        raise FileNotFoundError(f"no concept matches for the SAE at {sae_dir}: it has no recovery.json and no "
                                f"activation cache ({cache or 'none recorded'}); run `interp recovery --sae {sae_dir} "
                                "--cache CACHE`, or name each feature's concept in the spec")
    with ActivationReader(cache) as reader:
        sae.check_width(torch.zeros(1, reader.d))
        return [asdict(m) for m in recover_concepts(sae, reader)]


def concept_of(matches: list[Match], feature: int) -> str | None:
    """The concept whose best latent is `feature` (the best F1 if several), else None."""
    mine = [m for m in matches if m.latent == feature]
    return max(mine, key=lambda m: m.f1).concept if mine else None


def latent_of(matches: list[Match], concept: str) -> Match:
    for m in matches:
        if m.concept == concept:
            return m
    raise KeyError(f"no latent matches concept {concept!r}; matched concepts: {', '.join(m.concept for m in matches)}")


def labels(matches: list[Match]) -> dict[int, str]:
    """latent -> concept, for tables."""
    out: dict[int, str] = {}
    for m in sorted(matches, key=lambda m: m.f1):
        out[m.latent] = m.concept
    return out
