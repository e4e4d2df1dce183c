"""`interp recovery`: does the SAE have a feature for each concept of the shapes world?

The scoring itself works on arrays and lives with the ground truth (`interp.shapes.concepts`);
this module feeds it the SAE's activations on the cache's labelled image tokens, chunk by
chunk, and writes the report to RUN/recovery.json, the one place every later stage reads it from
(`interp.shapes.concepts.load_recovery`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interp.infra.cli_config import Command, positional
from interp.infra.layout import RunLayout
from interp.shapes.concepts import RecoveryReport, contiguous_runs, recover_concepts, write_recovery


def encoded_chunks(sae, reader, rows: np.ndarray, chunk_rows: int = 32768):
    """A pass over `rows` of the cache: (raw rows, SAE activations) as float32 arrays, read sequentially."""
    with torch.no_grad():
        for s in range(0, len(rows), chunk_rows):
            x = torch.cat([reader.read(int(a), int(b)) for a, b in contiguous_runs(rows[s: s + chunk_rows])])
            yield x.numpy(), sae.encode(x.to(sae.device, sae.dtype)).float().cpu().numpy()


def recover(sae, reader, f1_min: float = 0.9, threshold: float = 0.05, chunk_rows: int = 32768,
            gt=None, baselines: RecoveryReport | None = None) -> RecoveryReport:
    """The best feature of `sae` per concept, over the shapes-world image tokens of `reader`'s cache
    (`gt`: the cache's `token_concepts`, and `baselines`: a report on the same rows whose raw-neuron and
    linear-probe F1s are reused, when the caller has them already)."""
    from interp.shapes.ground_truth import token_concepts

    sae.check_width(torch.zeros(1, reader.d))
    gt = gt if gt is not None else token_concepts(reader, with_object=False)
    known = None if baselines is None else {m.concept: m for m in baselines.concepts}
    matches = recover_concepts(lambda: encoded_chunks(sae, reader, gt.rows, chunk_rows), gt.concepts,
                               gt.labels(threshold),
                               neuron_f1=None if known is None else [known[c].neuron_f1 for c in gt.concepts],
                               probe_f1=None if known is None else [known[c].probe_f1 for c in gt.concepts])
    return RecoveryReport(matches, f1_min)


def recovery_across_seeds(reader, sae_cfg, train_cfg, seeds, known: dict | None = None,
                          f1_min: float = 0.9) -> dict[int, RecoveryReport]:
    """Concept recovery of one recipe trained with each of `seeds` (nothing written): whether recovery
    holds for the recipe or only for a lucky seed. `known`: {seed: RecoveryReport} already measured (the
    run's own SAE), not retrained."""
    from dataclasses import replace

    from interp.shapes.ground_truth import token_concepts
    from saes.train import train

    out = dict(known or {})
    gt = token_concepts(reader, with_object=False) if any(s not in out for s in seeds) else None
    for seed in seeds:
        if seed not in out:
            sae = train(sae_cfg, replace(train_cfg, seed=int(seed), progress=False), reader, None).sae
            first = next(iter(out.values()), None)  # the neuron and probe baselines are the same for every seed
            if first is not None and first.linear_ceiling is None:
                first = None  # a report from before probes: measure them once here
            out[seed] = recover(sae, reader, f1_min, gt=gt, baselines=first)
    return {s: out[s] for s in seeds}


def recovery_of(run, sae=None, reader=None, f1_min: float = 0.9) -> RecoveryReport:
    """The run's recovery report: RUN/recovery.json when it belongs to RUN/sae/ (same weights), else
    recovered now from the run's cache (ValueError "... no ground truth" for a cache of other data).
    `sae` and `reader`: the run's SAE and cache reader when the caller has them open already."""
    from interp.cache.reader import ActivationReader
    from interp.shapes.concepts import load_recovery
    from saes.sae import SAE, sae_fingerprint

    layout = RunLayout.of(run)
    if layout.recovery.exists():
        report = load_recovery(layout.recovery)
        if report.extra.get("sae_sha256") == sae_fingerprint(layout.sae):
            return report
    sae = sae if sae is not None else SAE.load(layout.sae)
    if reader is not None:
        return recover(sae, reader, f1_min)
    with ActivationReader(layout.cache) as reader:
        return recover(sae, reader, f1_min)


@dataclass
class RecoveryConfig:
    """`interp recovery`: ground-truth feature recovery of the run's SAE on its shapes-world cache."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/sae/ and RUN/activations.h5, writes RUN/recovery.json"""
    f1_min: float = 0.9
    """F1 at which a concept counts as recovered"""
    json: bool = False
    """print the report as JSON"""


def run_recovery(cfg: RecoveryConfig) -> RecoveryReport:
    from interp.cache.reader import ActivationReader
    from saes.sae import SAE, sae_fingerprint

    layout = RunLayout.of(cfg.run)
    sae = SAE.load(layout.sae)
    with ActivationReader(layout.cache) as reader:
        report = recover(sae, reader, cfg.f1_min)
    report.extra["sae_sha256"] = sae_fingerprint(layout.sae)
    write_recovery(report, layout.recovery)
    write_recovery_figure(report, layout)
    return report


def write_recovery_figure(report: RecoveryReport, run) -> Path:
    """RUN/recovery.html (plotly.js inside) and recovery.png: best feature, best neuron and linear probe per concept."""
    from interp.infra.plots import write_figure
    from saes.figures import recovery_bars

    return write_figure(recovery_bars(report.to_json()["concepts"]), RunLayout.of(run).recovery_figure("html"))[0]


def _report(report: RecoveryReport, cfg: RecoveryConfig) -> None:
    if cfg.json:
        print(json.dumps(report.to_json()))
        return
    print(f"{'concept':10s} {'feature':>7s} {'thresh':>7s} {'F1':>6s} {'prec':>6s} {'recall':>6s} {'AUROC':>6s} "
          f"{'neuron F1':>9s} {'probe F1':>8s}")
    for m in report.concepts:
        print(f"{m.concept:10s} {m.feature:7d} {m.threshold:7.3f} {m.f1:6.3f} {m.precision:6.3f} {m.recall:6.3f} "
              f"{m.auroc:6.3f} {m.neuron_f1:9.3f} {m.probe_f1:8.3f}")
    print(f"recovered {len(report.recovered)}/{len(report.concepts)} concepts at F1 >= {cfg.f1_min} "
          f"(mean F1 {report.mean_f1}, best raw neurons {report.mean_neuron_f1}); a linear probe finds "
          f"{report.linear_ceiling} of them; wrote {RunLayout.of(cfg.run).recovery}")


COMMANDS = [Command("recovery", RecoveryConfig, run_recovery,
                    "ground-truth feature recovery of the run's SAE on the shapes world", report=_report)]
