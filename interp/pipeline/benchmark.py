"""`interp benchmark`: SAE architectures and trainers side by side on the shapes world's ground truth.

The architectures section (`interp.pipeline.bench_archs`): every architecture of ours and one TopK SAE
by each of sae-lens's and sparsify's own trainers, on the same cache at the same budget, each scored
for reconstruction (FVU, L0, dead, CE loss recovered), concept recovery, SAEBench's absorption, sparse
probing and MCC with exact labels (`saes.metrics`) and, where the explain pipeline runs, explanation
accuracy; then a width sweep for feature splitting. Optionally (`--steer`) the steering flip rate of a
each of our SAEs, steered at its own layer. A markdown report and
plotly figures (HTML and PNG) go to the run directory, the numbers to RUN/benchmark.json
(`architectures.<name>`, `width_sweep.<name>.<width>`); `--readme README.md` pastes the table there.

Pointing it at another world: `--world` names the labels (`bench_archs.GROUND_TRUTH`), `--model` and
`--layer` the subject and layer to cache.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

from interp.infra.cli_config import Command, at_least, choices, positional
from interp.infra.durable import write_json, write_text
from interp.infra.layout import RunLayout
from interp.pipeline import bench_archs

SEED_ARCHS = ("topk", "matryoshka")  # --seeds: the absorption comparison's two architectures


@dataclass
class BenchmarkConfig:
    """`interp benchmark`: SAE architectures and trainers side by side against the shapes world's ground truth."""

    run: str = field(default="runs/benchmark", metadata=positional(required=False))
    """run directory: report.md, benchmark.json, figures, and one run per architecture (RUN/ARCH/)"""
    archs: tuple[str, ...] = field(default_factory=lambda: tuple(bench_archs.all_names()),
                                   metadata=choices(bench_archs.all_names))
    """SAEs to train: our architectures, and sae-lens / sparsify (TopK by that library's own trainer)"""
    world: str = field(default="shapes", metadata=choices(lambda: list(bench_archs.GROUND_TRUTH)))
    """whose ground-truth labels score the SAEs"""
    model: str = "shapes-subject"
    """the subject to cache (when the run has no cache yet)"""
    layer: str = "4"
    """the subject's layer to cache"""
    d_sae: int = field(default=256, metadata=at_least(1))
    """features of every SAE"""
    k: int = field(default=4, metadata=at_least(1))
    """active features per row (the k-sparse architectures and trainers)"""
    steps: int = field(default=3000, metadata=at_least(1))
    """training steps per SAE"""
    batch_size: int = field(default=1024, metadata=at_least(1))
    """rows per training step"""
    samples: int = field(default=3000, metadata=at_least(1))
    """shapes-world samples to cache (when the run has no cache yet)"""
    seed: int = 0
    """seed of the SAEs and of the cached samples"""
    cache: str | None = None
    """an existing shapes-world cache to link into RUN/activations.h5 instead of caching"""
    widths: tuple[int, ...] = (64, 256, 1024, 4096)
    """the width sweep's dictionary sizes (empty: no sweep)"""
    sweep_archs: tuple[str, ...] = ("topk", "matryoshka")
    """architectures of the width sweep"""
    sweep_steps: int = field(default=1000, metadata=at_least(1))
    """training steps per SAE of the width sweep"""
    ce_samples: int = field(default=64, metadata=at_least(0))
    """samples for CE loss recovered with each SAE spliced in (0: skip)"""
    explain: bool = True
    """the explanation columns (shapes-explainer explains and scores each SAE's features)"""
    crossmodal: bool = False
    """append the cross-modal section: an SAE on image and text tokens at every layer, as `interp
    crossmodal-sweep` (interp.pipeline.crossmodal; with --seeds, as many SAE seeds per layer); off by default,
    it doubles the benchmark's time"""
    steer: bool = False
    """the steering column: each of our SAEs steered at its own layer, its colour- and shape-flip rates"""
    methods: bool = True
    """the methods sections: explanation methods (explain.methods) and steering methods (steering.methods)
    side by side on one SAE, the reference work's against ours"""
    methods_arch: str | None = None
    """the architecture whose SAE the methods sections explain and steer (default: batchtopk, the demo's
    recipe, when it is among --archs, else the first of ours)"""
    methods_features: int | None = field(default=None, metadata=at_least(1))
    """explanation methods: only the densest this many live image features (default: every live one)"""
    methods_questions: int = field(default=60, metadata=at_least(1))
    """steering methods: test (and validation) questions per kind"""
    seeds: int = field(default=1, metadata=at_least(1))
    """SAE training seeds (seed, seed + 1, ...) of issue 16's three comparisons: the methods sections and
    TopK's and Matryoshka's absorption at --d-sae, again per further seed (RUN/seed-S/); benchmark.json
    `seeds` gets each margin's mean and worst seed (1: the benchmark's own SAEs only; each further seed
    is about 11 minutes of one core, two run at a time)"""
    readme: str | None = None
    """a markdown file whose benchmark-table block (between its markers) gets the rendered table"""
    parallel: bool = True
    """split the sections between this process and a second one beside it, the torch threads split between
    the two (most of the scoring and explaining is single-threaded Python): the architectures and the sweep's
    first architecture here, its other architectures and the methods sections there"""

    def __post_init__(self) -> None:
        self.archs, self.widths, self.sweep_archs = tuple(self.archs), tuple(self.widths), tuple(self.sweep_archs)
        known = bench_archs.all_names()
        bad = [a for a in self.archs + self.sweep_archs if a not in known]
        if bad:
            raise ValueError(f"unknown SAE {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
        ours = [a for a in self.archs if a not in bench_archs.EXTERNAL]
        if self.methods_arch is None and self.methods:
            self.methods_arch = "batchtopk" if "batchtopk" in ours else (ours[0] if ours else None)
        if self.methods and self.methods_arch not in ours:
            raise ValueError(f"the methods sections need one of our architectures among --archs ({', '.join(self.archs)}):"
                             f" {'--methods-arch ' + self.methods_arch + ' is not' if self.methods_arch else 'none is'}"
                             "; add it or pass --no-methods")
        if any(a in bench_archs.EXTERNAL for a in self.sweep_archs):
            raise ValueError(f"the width sweep runs our architectures only; drop {', '.join(bench_archs.EXTERNAL)} "
                             "from --sweep-archs")
        if self.seeds > 1 and not set(SEED_ARCHS) <= set(self.archs):
            raise ValueError(f"--seeds compares {' and '.join(SEED_ARCHS)}: add {', '.join(a for a in SEED_ARCHS if a not in self.archs)}"
                             " to --archs, or pass --seeds 1")
        if any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive, got {list(self.widths)}")


def _steer_column(arch_run: RunLayout) -> dict:
    """The colour- and shape-flip rates of the architecture's SAE, steered at its own layer (n/a where it fails)."""
    from interp.pipeline.stages import steer_and_attribute

    try:
        summary = steer_and_attribute(arch_run, n_attr=20)
        return {k: summary.get(k) for k in ("steering_success", "steering_success_shape")}
    except ValueError as e:
        print(e)
        return {}


def _methods_sections(arch_run: RunLayout, cfg: BenchmarkConfig) -> dict:
    """`explanation_methods` and `steering_methods` on one architecture's SAE: the reference work's methods
    against ours, on the same features, images and questions (the per-feature records stay in its run)."""
    from explain.methods import explanation_methods
    from interp.pipeline.stages import ensure_features
    from steering.methods import steering_methods

    ensure_features(arch_run)
    explained = explanation_methods(arch_run, max_features=cfg.methods_features, seed=cfg.seed)
    out = {"explanation_methods": {"sae": cfg.methods_arch, "features": explained["n_features"],
                                   "max_features": cfg.methods_features,
                                   **{m: {k: v for k, v in explained[m].items() if k != "explanations"}
                                      for m in ("ours", "reference", "contrastive")}}}
    steered = steering_methods(arch_run, kinds=("color", "shape"), n_questions=cfg.methods_questions, seed=cfg.seed)
    out["steering_methods"] = {**steered, "sae": cfg.methods_arch, "sae_path": steered["sae"]}
    return out


def _sweep_job(cache: str, scored: bench_archs.Scored, names: tuple, widths: tuple, threads: int, kw: dict) -> dict:
    """The width sweep's architectures `names`, in the process beside (`--parallel`), on the parent's rows."""
    import torch

    from interp.cache.reader import ActivationReader

    torch.set_num_threads(threads)
    with ActivationReader(cache) as reader:
        return bench_archs.run_width_sweep(None, reader, scored, names, widths, **kw)


def _methods_job(arch_run: RunLayout, cfg: BenchmarkConfig, threads: int) -> tuple[dict, float]:
    """The methods sections in the process beside (`--parallel`); returns them and their seconds."""
    import torch

    torch.set_num_threads(threads)
    t = time.time()
    return _methods_sections(arch_run, cfg), round(time.time() - t, 1)


@contextmanager
def _beside(cfg: BenchmarkConfig, needed: bool):
    """A process beside this one (`--parallel`; spawned: torch and forks do not mix) with half the torch
    threads, this process keeping the rest; yields (its pool, its threads), or (None, 0) in line. Its jobs
    run one after another in the order they are given. Leaving the block stops it (a no-op once its jobs
    are done) and gives the threads back."""
    if not (cfg.parallel and needed):
        yield None, 0
        return
    import multiprocessing as mp

    import torch

    threads = torch.get_num_threads()
    child = max(1, threads // 2)
    pool = mp.get_context("spawn").Pool(1)
    torch.set_num_threads(max(1, threads - child))
    try:
        yield pool, child
    finally:
        pool.terminate()
        torch.set_num_threads(threads)


def _sections(cfg: BenchmarkConfig, run: RunLayout, reader, scored, sweep_names: tuple, timings: dict
              ) -> tuple[dict, dict, dict]:
    """The architectures, methods and width-sweep sections. With `--parallel` the work is split in two
    lanes of about equal length (measured on 2 cores: architectures 545 s, methods 429 s, sweep topk
    156 s and matryoshka 311 s): this process trains and scores the architectures, then sweeps the first
    of the sweep's architectures; the process beside sweeps the others, then runs the methods sections,
    given to it once the methods' SAE is trained and scored here (its run is not touched here after)."""
    kw = {"k": cfg.k, "steps": cfg.sweep_steps, "batch_size": cfg.batch_size, "seed": cfg.seed}
    with _beside(cfg, needed=cfg.methods or len(sweep_names) > 1) as (pool, child):
        here, there = (sweep_names[:1], sweep_names[1:]) if pool else (sweep_names, ())
        swept = pool.apply_async(_sweep_job, (str(run.cache), scored, there, cfg.widths, child, kw)) if there else None
        pending: dict = {}

        def done(name: str) -> None:
            if pool and cfg.methods and name == cfg.methods_arch:
                pending["methods"] = pool.apply_async(_methods_job, (run.arch_run(name), cfg, child))

        t = time.time()
        archs = bench_archs.run_architectures(run, reader, scored, cfg.archs, d_sae=cfg.d_sae, k=cfg.k,
                                              steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                              explain=cfg.explain, ce_samples=cfg.ce_samples, done=done)
        if cfg.steer:
            for name in cfg.archs:
                if name not in bench_archs.EXTERNAL:
                    archs[name].update(_steer_column(run.arch_run(name)))
        timings["architectures"] = round(time.time() - t, 1)
        methods = {}
        if cfg.methods and not pool:
            t = time.time()
            methods = _methods_sections(run.arch_run(cfg.methods_arch), cfg)
            timings["methods"] = round(time.time() - t, 1)
        sweep = bench_archs.run_width_sweep(run, reader, scored, here, cfg.widths, **kw)
        t = time.time()
        if swept is not None:
            sweep.update(swept.get())
        if "methods" in pending:
            methods, timings["methods"] = pending["methods"].get()
        timings["waiting_beside"] = round(time.time() - t, 1)
    timings["width_sweep"] = round(sum(r["seconds"] for by_width in sweep.values() for r in by_width.values()), 1)
    return archs, methods, {name: sweep[name] for name in sweep_names}


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    from interp.cache.reader import ActivationReader
    from interp.cache.writer import CacheConfig, build_cache
    from interp.infra.runinfo import write_run_info

    t0 = time.time()
    run = RunLayout.of(cfg.run).mkdir()

    def subject_cache(layout: RunLayout, layer: str, existing: str | None) -> None:
        if existing:
            layout.link("cache", existing)
        else:
            build_cache(CacheConfig(run=str(layout.root), model=cfg.model, layer=layer, samples=cfg.samples,
                                    seed=cfg.seed, batch_size=32))

    subject_cache(run, cfg.layer, cfg.cache)
    write_run_info(run.run_info("benchmark"), {"command": "benchmark", "config": asdict(cfg)})
    timings = {"cache": round(time.time() - t0, 1)}
    with ActivationReader(run.cache) as reader:
        t = time.time()
        scored = bench_archs.Scored.of(reader, cfg.world, seed=cfg.seed)
        timings["ground_truth"] = round(time.time() - t, 1)
        sweep_names = cfg.sweep_archs if cfg.widths else ()
        archs, methods, sweep = _sections(cfg, run, reader, scored, sweep_names, timings)
        first = next(iter(archs.values()), {})
        neurons = {"sparse_probing_top1": first.get("sparse_probing_neurons_top1"),
                   "sparse_probing_top5": first.get("sparse_probing_neurons_top5")}
        if archs:
            from interp.shapes.concepts import load_recovery

            neurons["mean_f1"] = load_recovery(run.arch_run(next(iter(archs))).recovery).mean_neuron_f1
    report = {"world": cfg.world, "cache": str(run.cache), "steering": "at the SAE's own layer" if cfg.steer else None,
              "concepts": list(scored.gt.concepts), "labelled_rows": int(len(scored.gt.rows)),
              "held_out_rows": int(scored.test.sum()),
              "budget": {"d_sae": cfg.d_sae, "k": cfg.k, "steps": cfg.steps, "batch_size": cfg.batch_size,
                         "seed": cfg.seed, "sweep_steps": cfg.sweep_steps},
              "architectures": archs, "neurons": neurons, "width_sweep": sweep, **methods, "seconds": timings}
    if cfg.seeds > 1:
        t = time.time()
        report["seeds"] = _seeds_section(cfg, run, scored, report)
        timings["seeds"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t0, 1)  # the report holds `timings` itself
    write_json(run.benchmark, report, indent=1)
    _write_report(report, run)
    if cfg.crossmodal:  # its own section, appended to report.md and benchmark.json
        from interp.pipeline.crossmodal import add_crossmodal_section

        add_crossmodal_section(run, report, min(cfg.samples, 1500), cfg.d_sae, cfg.k, cfg.steps, cfg.seed,
                               seeds=cfg.seeds)
    if cfg.readme and not bench_archs.paste_into(cfg.readme, report):
        print(f"{cfg.readme} has no benchmark-table markers ({bench_archs.README_BEGIN} ... "
              f"{bench_archs.README_END}): nothing pasted")
    return report


# ---------------------------------------------------------------- across SAE training seeds (--seeds)

def _seed_numbers(sections: dict) -> dict:
    """One seed's numbers of issue 16's three comparisons, from a report's (or a seed run's) sections."""
    em, sm, archs = sections.get("explanation_methods") or {}, sections.get("steering_methods") or {}, sections["architectures"]
    return {"explanation": {m: (em.get(m) or {}).get("explanation_accuracy_all") for m in ("ours", "reference", "contrastive")},
            "steering": {m: {k: (sm.get(m) or {}).get(k) for k in ("flip_rate", "collateral")} for m in ("ours", "reference")},
            "steering_target": sm.get("target") or {},  # steering.methods.target: the one place of that rule
            "absorption": {a: (archs.get(a) or {}).get("absorption") for a in SEED_ARCHS}}


def seed_margins(per_seed: list[dict]) -> dict:
    """Mean and worst seed of each margin the issue's targets are about, and whether each target holds at
    every seed (a margin some seed lacks counts as not met; the steering targets are each seed's
    `steering.methods.target`)."""
    def stat(values: list, worst=min) -> dict:
        vals = [v for v in values if v is not None]
        return ({"mean": round(float(np.mean(vals)), 4), "worst": round(float(worst(vals)), 4), "n": len(vals)}
                if vals else {"n": 0})

    def diff(a, b):
        return None if a is None or b is None else a - b

    e, st, ab = ([s[k] for s in per_seed] for k in ("explanation", "steering", "absorption"))
    out = {"explanation_contrastive_minus_reference": stat([diff(x["contrastive"], x["reference"]) for x in e]),
           "explanation_ours_minus_reference": stat([diff(x["ours"], x["reference"]) for x in e]),
           "steering_flip_ours_minus_reference": stat([diff(x["ours"]["flip_rate"], x["reference"]["flip_rate"])
                                                       for x in st]),
           "steering_collateral_ours_over_reference": stat(
               [x["ours"]["collateral"] / x["reference"]["collateral"]
                if x["ours"]["collateral"] is not None and x["reference"]["collateral"] else None for x in st], max),
           "absorption_topk_minus_matryoshka": stat([diff(x["topk"], x["matryoshka"]) for x in ab])}
    def every_seed(key: str, holds) -> bool:
        return out[key]["n"] == len(per_seed) and bool(holds(out[key]["worst"]))

    def every_steering(key: str) -> bool:
        return all((s.get("steering_target") or {}).get(key) is True for s in per_seed)

    out["target_met_at_every_seed"] = {
        "explanation_contrastive_minus_reference": every_seed("explanation_contrastive_minus_reference", lambda w: w >= 0.1),
        "steering_flip_ours_minus_reference": every_steering("flip_rate>=reference"),
        "steering_collateral_ours_over_reference": every_steering("collateral<=reference/2"),
        "absorption_topk_minus_matryoshka": every_seed("absorption_topk_minus_matryoshka", lambda w: w > 0)}
    return out


def _seed_archs(cfg: BenchmarkConfig) -> tuple[str, ...]:
    """The SAEs each further seed retrains: the methods' one (with the methods sections) and SEED_ARCHS."""
    return tuple(dict.fromkeys(((cfg.methods_arch,) if cfg.methods else ()) + SEED_ARCHS))


def _seed_job(run: RunLayout, scored: bench_archs.Scored, cfg: BenchmarkConfig, seed: int, threads: int) -> dict:
    """One further seed (`--seeds`), in a process of its own: the methods' SAE and TopK and Matryoshka
    retrained with `seed` under RUN/seed-S/, scored, and the methods sections run on the first."""
    import torch

    from interp.cache.reader import ActivationReader

    torch.set_num_threads(threads)
    seed_run = run.seed_run(seed).mkdir()
    seed_run.link("cache", run.cache)
    names = _seed_archs(cfg)
    with ActivationReader(run.cache) as reader:
        archs = bench_archs.run_architectures(seed_run, reader, scored, names, d_sae=cfg.d_sae, k=cfg.k,
                                              steps=cfg.steps, batch_size=cfg.batch_size, seed=seed, explain=False,
                                              ce_samples=0)
    methods = _methods_sections(seed_run.arch_run(cfg.methods_arch), cfg) if cfg.methods else {}
    return {"seed": seed, **_seed_numbers({"architectures": archs, **methods})}


def _seeds_section(cfg: BenchmarkConfig, run: RunLayout, scored, report: dict) -> dict:
    """`seeds` of benchmark.json (`--seeds N`): the methods sections and TopK's and Matryoshka's absorption
    again for SAE training seeds seed+1 .. seed+N-1 on the same cache, examples and questions (only the
    SAEs' initialisation and batch order change), two seeds at a time in processes of their own (one torch
    thread each). A re-run reads the trained SAEs back and resumes the steering sweeps."""
    import multiprocessing as mp

    seeds = list(range(cfg.seed + 1, cfg.seed + cfg.seeds))
    print(f"seeds {', '.join(map(str, seeds))}: {' and '.join(_seed_archs(cfg))} "
          "retrained per seed, the methods sections run again")
    with mp.get_context("spawn").Pool(min(2, len(seeds))) as pool:
        rest = pool.starmap(_seed_job, [(run, scored, cfg, s, 1) for s in seeds])
    per_seed = [{"seed": cfg.seed, **_seed_numbers(report)}] + rest
    return {"sae": cfg.methods_arch, "seeds": [p["seed"] for p in per_seed], "per_seed": per_seed,
            **seed_margins(per_seed)}


def _write_report(report: dict, run: RunLayout) -> None:
    budget = report["budget"]
    lines = ["# SAE architectures and trainers on the shapes world", "",
             f"Cache: `{report['cache']}` ({report['labelled_rows']} labelled rows, {report['held_out_rows']} "
             f"held out); world `{report['world']}`, concepts: {', '.join(report['concepts'])}.", "",
             f"Budget of every SAE: {budget['d_sae']} features, k = {budget['k']}, {budget['steps']} steps of "
             f"{budget['batch_size']} rows, seed {budget['seed']}.", "", bench_archs.render_table(report), ""]
    steered = {a: r for a, r in report["architectures"].items() if r.get("steering_success") is not None}
    if steered:
        lines += ["Steering flip rates of each SAE at its own layer (colour / shape): " + ", ".join(
            f"{a} {r['steering_success']:.1%} / {r.get('steering_success_shape') or 0:.1%}" for a, r in steered.items()),
            ""]
    sweep = bench_archs.render_sweep(report)
    if sweep:
        lines += [f"## Width sweep ({budget['sweep_steps']} steps each)", "", sweep, ""]
    methods = bench_archs.render_methods(report)
    if methods:
        lines += ["## The reference work's methods against ours", "", methods, ""]
    seeds = bench_archs.render_seeds(report)
    if seeds:
        lines += ["## Across SAE training seeds", "", seeds, ""]
    archs, concepts = report["architectures"], report["concepts"]
    lines += ["## Best F1 per concept", "", "| concept | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for c in concepts:
        lines.append(f"| {c} | " + " | ".join(f"{archs[a]['f1'][c]:.3f}" for a in archs) + " |")
    lines += ["", "## Absorption per concept", "", "| concept | " + " | ".join(archs) + " |",
              "|---|" + "---|" * len(archs)]
    for c in concepts:
        lines.append(f"| {c} | " + " | ".join(bench_archs._fmt((archs[a]["per_concept"].get(c) or {}).get("absorption"))
                                             for a in archs) + " |")
    names = bench_archs.figures(report, run) if archs else []
    lines += ["", "Figures: " + ", ".join(f"`{n}.html` (and `.png`)" for n in names) + ".",
              "", "Seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()) + "."]
    write_text(run.report, "\n".join(lines) + "\n")


COMMANDS = [Command("benchmark", BenchmarkConfig, run_benchmark,
                    "SAE architectures and trainers side by side against the shapes world's ground truth",
                    report=lambda r, cfg: print(f"wrote {RunLayout.of(cfg.run).report}"))]
