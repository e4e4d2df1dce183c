"""`interp bench steer`: steered generation against the same generation without an intervention.

On the shapes subject, with an SAE at its layer (random TopK weights of the given size: the cost
of an intervention does not depend on what the features mean), one batch of prompts with images
is generated greedily for `max_new_tokens` tokens, every run forced to the same length
(`min_new_tokens`), so only the intervention differs:

- baseline: `steering.steer.generate` with no intervention (the model's own generate);
- for each engine (nnsight, torch hooks) and each of `positions`: the same call with one clamp
  intervention there ("all": the prompt and every generated token, the costliest; "image": the
  prompt's image tokens only).

Rounds run the variants back to back in a rotating order, so background load hits them alike;
each ratio is the median over rounds of (steered time / baseline time of the same round).
Target: `ratios.steer_over_generate` (the worst engine and positions) <= 1.15.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from interp.infra.cli_config import Command, choices


@dataclass
class BenchSteerConfig:
    """`interp bench steer`: steered generation against the same generation without an intervention."""

    model: str = "shapes-subject"
    """model to generate with (an organism name, hub id or path)"""
    layer: str = "4"
    """layer the SAE reads and the intervention edits (the subject's middle layer, where the demo steers)"""
    d_sae: int = 256
    """features of the (random) SAE (the demo's subject SAE: 256, k 4)"""
    k: int = 4
    """active features per row of the SAE"""
    batch_size: int = 32
    """prompts generated together"""
    max_new_tokens: int = 16
    """tokens generated per prompt (every run generates exactly this many)"""
    positions: tuple[str, ...] = field(default=("all", "image"), metadata=choices(["all", "image", "text", "generated"]))
    """where the intervention applies, each timed (all: the prompt and every generated token; image: prompt only)"""
    rounds: int = 11
    """rounds of baseline + steered runs (each ratio is the median over rounds)"""
    engines: tuple[str, ...] = field(default=("nnsight", "torch"), metadata=choices(["nnsight", "torch"]))
    """hooking engines to time"""
    prompt: str = "what color is the circle ?"
    """the question asked about every image"""
    threads: int = 1
    """torch CPU threads"""
    seed: int = 0
    """seed of the SAE's weights and of the images"""
    json: bool = False
    """print one JSON object"""


def _queries(lm, cfg: BenchSteerConfig):
    from steering.steer import Query

    if not lm.is_multimodal:
        return [Query(cfg.prompt) for _ in range(cfg.batch_size)]
    return [Query.load(cfg.prompt, f"shapes:test:{i}:{cfg.seed}") for i in range(cfg.batch_size)]


def bench_steer(cfg: BenchSteerConfig) -> dict:
    """Time generation with and without one intervention, per engine; returns the report."""
    from interp.model.models import load_model
    from saes.sae import SAE, SAEConfig
    from steering.interventions import Intervention, layer_width
    from steering.steer import generate, prepare, setup_for

    torch.set_num_threads(cfg.threads)
    lm = load_model(cfg.model, device="cpu")
    width = layer_width(lm)
    g = torch.Generator().manual_seed(cfg.seed)
    sae = SAE(SAEConfig(arch="topk", d_in=width, d_sae=cfg.d_sae, k=cfg.k, normalize=False, model_name=cfg.model,
                        hook_name=None), generator=g).eval()
    setup = setup_for(lm, sae, "(random SAE)", layer=cfg.layer)
    batch = prepare(lm, _queries(lm, cfg))
    feature = 0
    with torch.no_grad():  # a feature that fires somewhere, clamped at twice its largest activation
        acts = sae.encode(torch.randn(256, width, generator=g))
        feature = int(acts.amax(0).argmax())
        value = 2 * float(acts[:, feature].max())
    interventions = {p: [Intervention(feature, "clamp", value, positions=p)] for p in cfg.positions}
    gen_cfg = lm.model.generation_config
    saved = gen_cfg.min_new_tokens
    gen_cfg.min_new_tokens = cfg.max_new_tokens  # no early stop: every run does the same amount of work
    variants = {"baseline": lambda: generate(setup, batch, max_new_tokens=cfg.max_new_tokens)}
    for p in cfg.positions:
        for engine in cfg.engines:
            variants[f"{engine}@{p}"] = (lambda e, ivs: lambda: generate(
                setup, batch, ivs, max_new_tokens=cfg.max_new_tokens, engine=e))(engine, interventions[p])
    times: dict[str, list[float]] = {n: [] for n in variants}
    outputs = {}
    try:
        for name, run in variants.items():  # warm-up (nnsight builds its wrapper on first use)
            outputs[name] = run()
        names = list(variants)
        for r in range(cfg.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        gen_cfg.min_new_tokens = saved
    results = {n: {"median_s": round(statistics.median(t), 4), "times_s": [round(x, 4) for x in t],
                   "new_tokens": int(outputs[n].sequences.shape[1] - batch.length)} for n, t in times.items()}
    ratios = {}
    for n in variants:
        if n == "baseline":
            continue
        per_round = [s / b for s, b in zip(times[n], times["baseline"])]
        ratios[f"steer_over_generate_{n}"] = round(statistics.median(per_round), 3)
        results[n]["answers_changed"] = sum(a != b for a, b in zip(outputs[n].texts, outputs["baseline"].texts))
    for e in cfg.engines:
        ratios[f"steer_over_generate_{e}"] = max(ratios[f"steer_over_generate_{e}@{p}"] for p in cfg.positions)
    ratios["steer_over_generate"] = max(ratios[f"steer_over_generate_{e}"] for e in cfg.engines)
    if len(cfg.engines) == 2:
        results["engines_agree"] = all(outputs[f"nnsight@{p}"].tokens == outputs[f"torch@{p}"].tokens
                                       for p in cfg.positions)
    report = {"config": asdict(cfg), "sae": {"d_in": width, "d_sae": cfg.d_sae, "k": cfg.k, "layer": setup.hook.name},
              "interventions": {p: ivs[0].to_dict() for p, ivs in interventions.items()},
              "prompt_tokens": batch.length, "results": results, "ratios": ratios,
              "target": {"steer_over_generate": 1.15}, "meets_target": ratios["steer_over_generate"] <= 1.15,
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if not cfg.json:
        print(f"{cfg.model} {setup.hook.name}, SAE {cfg.d_sae} (k {cfg.k}), batch {cfg.batch_size} x "
              f"{cfg.max_new_tokens} new tokens: baseline {results['baseline']['median_s'] * 1e3:.0f} ms")
        for n in variants:
            if n != "baseline":
                print(f"  {n}: {results[n]['median_s'] * 1e3:.0f} ms -> {ratios[f'steer_over_generate_{n}']:.3f}x "
                      f"({results[n]['answers_changed']}/{cfg.batch_size} answers changed)")
    return report


COMMANDS = [Command("bench steer", BenchSteerConfig, bench_steer,
                    "generation with an intervention against the same generation without, per engine",
                    report=lambda r, cfg: print(json.dumps(r)) if cfg.json else None)]
