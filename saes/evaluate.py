"""`interp eval`: how good an SAE is, on its cache and spliced back into its model.

- Reconstruction over the whole evaluation set: FVU as one ratio of sums (not a mean of
  per-batch ratios, which overweights small batches), L0, dead and dense fractions, the
  feature density histogram.
- Spliced into the model at its layer, on the token roles it was trained on: next-token CE
  with the reconstruction (without, and as a check with, the error term), against the clean
  model and zero-ablation: CE loss recovered and KL to the clean model. On the shapes world
  the loss is on the ground-truth caption, so it measures what the image tokens carry.
- For the shapes organisms: VQA accuracy with the SAE spliced in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from interp.infra.cli_config import Command, at_least, positional
from interp.infra.durable import write_json
from interp.infra.layout import RunLayout

DENSE = 0.1  # a feature firing on more than 10% of rows is "dense"


@torch.no_grad()
def reconstruction_metrics(sae, reader, chunk_rows: int = 16384, max_rows: int | None = None) -> dict:
    n = min(reader.n_rows, max_rows or reader.n_rows)
    if n == 0:
        raise ValueError(f"{reader.path} holds no rows to evaluate on")
    total = torch.zeros(reader.d, dtype=torch.float64)
    sq_total, err_total = 0.0, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for s in range(0, n, chunk_rows):
        x = reader.read(s, min(s + chunk_rows, n)).to(sae.device, sae.dtype)
        acts = sae.encode(x)
        err_total += (sae.decode(acts) - x).double().pow(2).sum().item()
        total += x.double().sum(0).cpu()
        sq_total += x.double().pow(2).sum().item()
        fired += (acts > 0).sum(0, dtype=torch.float64).cpu()  # summed as float64: no float copy of the mask
    mean = total / n
    var_total = sq_total - n * mean.pow(2).sum().item()  # sum of squared deviations from the mean row
    density = (fired / n).numpy()
    log_density = np.log10(np.clip(density[density > 0], 1e-10, None))
    hist, edges = np.histogram(log_density, bins=30) if len(log_density) else (np.array([]), np.array([]))
    return {
        "rows": n, "fvu": err_total / var_total, "mse": err_total / (n * reader.d), "l0": fired.sum().item() / n,
        "dead_fraction": float((density == 0).mean()), "dense_fraction": float((density > DENSE).mean()),
        "density_histogram": {"log10_density_edges": edges.round(4).tolist(), "counts": hist.tolist()},
        "density": density,
    }


def _eval_samples(reader, n: int):
    """The first `n` cached samples re-loaded, the prompt template to render them with, and the
    answers to score (else None).

    On the shapes world each image gets one of the subject's questions (cycling through its
    tasks) and its ground-truth answer is scored: the subject was trained on those answers, so
    the spliced loss measures what the SAE keeps of what the model reads from the image."""
    import numpy as np

    from interp.cache.data import QA_TASKS, Sample, data_roots, load_image
    from interp.shapes.ground_truth import parse_shapes_ref, scene_of
    from interp.shapes.world import scene_questions

    template = reader.meta["prompt_template"]
    roots = data_roots(reader.meta.get("data"))
    samples, answers = [], []
    for i in range(min(n, reader.n_samples)):
        s = reader.sample(i)
        image = load_image(s.image_ref, roots) if s.has_image else None
        text, answer = s.prompt, None
        if parse_shapes_ref(s.image_ref) and "{image}" in template and "{text}" not in template:
            rng = np.random.default_rng([i, 0xE7A1])
            qa = (scene_questions(scene_of(s.image_ref), rng, (QA_TASKS[i % len(QA_TASKS)],))
                  or scene_questions(scene_of(s.image_ref), rng, ("at",)))[0]
            text, answer = qa.question, qa.answer
        samples.append(Sample(s.source_index, s.image_ref, image, text=text))
        answers.append(answer)
    if "{image}" not in template:
        template = "{text}"  # text models: the stored prompt is the whole user text
    if answers and all(a is not None for a in answers):
        return samples, "{image} {text}", answers
    return samples, template, None


@torch.no_grad()
def spliced_metrics(sae, reader, lm=None, n_samples: int = 64, batch_size: int = 16) -> dict:
    """CE and KL with the SAE spliced in at the cached layer, on the cached roles."""
    from interp.model.hooks import patch_output
    from interp.model.inputs import model_inputs, prompts
    from interp.model.models import load_model
    from interp.cache.format import role_codes
    from interp.model.token_map import token_table

    meta = reader.meta
    lm = lm or load_model(meta["model"], revision=meta.get("revision") or None)
    codes = role_codes(meta["roles"])
    samples, template, answers = _eval_samples(reader, n_samples)
    sums = {k: 0.0 for k in ("clean", "spliced", "spliced_with_error", "zero_ablated", "kl_spliced", "kl_zero")}
    count = 0
    for s in range(0, len(samples), batch_size):
        batch = samples[s: s + batch_size]
        ans = answers[s: s + batch_size] if answers else None
        texts, users = prompts(lm, batch, template, ans)
        inputs = model_inputs(lm, batch, texts)
        ids = inputs.get("input_ids", inputs.get("input"))
        table = token_table(lm, {"input_ids": ids, **{k: v for k, v in inputs.items() if k != "input"}},
                            [[b.image] for b in batch] if lm.is_multimodal else None, users)
        splice = torch.zeros(ids.shape, dtype=torch.bool)
        keep = np.isin(table["role"], codes)
        splice[table["sample"][keep], table["position"][keep]] = True
        target = _loss_positions(lm, inputs, ids, table, ans)
        splice, target = splice.to(ids.device), target.to(ids.device)

        def run(edit=None):
            if edit is None:
                return _logits(lm, inputs)
            with patch_output(lm.model, meta["module_path"], edit):
                return _logits(lm, inputs)

        recon = _reconstruct(sae)
        logits = {"clean": run(), "spliced": run(splice_at(lambda: splice, recon)),
                  "spliced_with_error": run(splice_at(lambda: splice, lambda x: recon(x) + (x - recon(x)))),
                  "zero_ablated": run(splice_at(lambda: splice, torch.zeros_like))}
        labels = ids[:, 1:]
        for k, lg in logits.items():
            ce = F.cross_entropy(lg[:, :-1].float().transpose(1, 2), labels, reduction="none")
            sums[k] += ce[target[:, 1:]].sum().item()
        logp_clean = F.log_softmax(logits["clean"][:, :-1].float(), -1)
        for k, name in (("spliced", "kl_spliced"), ("zero_ablated", "kl_zero")):
            logp = F.log_softmax(logits[k][:, :-1].float(), -1)
            kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
            sums[name] += kl[target[:, 1:]].sum().item()
        count += int(target[:, 1:].sum())
    m = {k: v / max(count, 1) for k, v in sums.items()}
    denom = m["zero_ablated"] - m["clean"]
    return {"ce_clean": m["clean"], "ce_spliced": m["spliced"], "ce_spliced_with_error": m["spliced_with_error"],
            "ce_zero_ablated": m["zero_ablated"],
            "ce_loss_recovered": (m["zero_ablated"] - m["spliced"]) / denom if abs(denom) > 1e-9 else float("nan"),
            "kl_spliced": m["kl_spliced"], "kl_zero_ablated": m["kl_zero"], "loss_tokens": count,
            "loss_on": "ground-truth answers to world questions" if answers else "text after the image"}


def _reconstruct(sae):
    """x -> the SAE's reconstruction of x, in x's dtype."""
    return lambda x: sae(x.to(sae.dtype)).to(x.dtype)


def splice_at(mask: Callable[[], torch.Tensor | None], value_fn: Callable[[torch.Tensor], torch.Tensor]):
    """A layer-output edit (for interp.model.hooks.patch_output) that replaces the positions of `mask()` by
    value_fn(them). Calls whose [batch, seq] differs from the mask's (later generation steps) pass through."""

    def edit(out: torch.Tensor) -> torch.Tensor:
        m = mask()
        if m is None or out.shape[:2] != m.shape:
            return out
        new = out.clone()
        new[m] = value_fn(out[m]).to(out.dtype)
        return new

    return edit


def _logits(lm, inputs) -> torch.Tensor:
    if lm.kind == "hooked-transformer":
        return lm.model(inputs["input"])
    return lm.model(**inputs).logits


def _loss_positions(lm, inputs, ids, table, answers) -> torch.Tensor:
    """[B, T] bool: the tokens whose prediction is scored (the answers, else text after the image)."""
    from interp.cache.format import is_image, is_text

    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool().cpu()
    target = torch.zeros(ids.shape, dtype=torch.bool)
    if answers is not None:
        for i, a in enumerate(answers):
            n = len(lm.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1  # + eos
            last = int(mask[i].nonzero().max()) + 1
            target[i, last - n: last] = True
        return target
    image_rows, text_rows = is_image(table["role"]), is_text(table["role"])
    for i in range(ids.shape[0]):
        img = table["position"][image_rows & (table["sample"] == i)]
        after = table["position"][text_rows & (table["sample"] == i)]
        after = after[after > (img.max() if len(img) else -1)]
        target[i, after] = True
    return target


@torch.no_grad()
def vqa_with_sae(sae, reader, lm=None, n: int = 100) -> dict | None:
    """Organism VQA accuracy per task, clean and with the SAE spliced into the image tokens."""
    from interp.model.hooks import patch_output
    from interp.shapes.organisms import ORGANISMS
    from interp.shapes.organisms.build import SPECS
    from interp.shapes.organisms.eval import evaluate

    meta = reader.meta
    if meta["model"] not in ORGANISMS or "image_patch" not in meta["roles"]:
        return None
    from interp.model.models import load_model

    lm = lm or load_model(meta["model"])
    tasks = tuple(t for t in SPECS[ORGANISMS[meta["model"]]].tasks if t != "region")
    image_id = lm.model.config.image_token_id
    state = {}

    def remember(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["mask"] = (ids == image_id) if ids is not None else None

    clean = evaluate(lm.model, lm.processor, tasks, n=n, split="test")
    handle = lm.model.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        with patch_output(lm.model, meta["module_path"], splice_at(lambda: state.get("mask"), _reconstruct(sae))):
            spliced = evaluate(lm.model, lm.processor, tasks, n=n, split="test")
    finally:
        handle.remove()
    return {"clean": clean, "spliced": spliced}


@dataclass
class EvalConfig:
    """`interp eval`: how good the run's SAE is, on a cache and spliced back into its model."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: evaluates RUN/sae/, writes RUN/eval/"""
    cache: str | None = None
    """activation cache to evaluate on (none: the run's own, RUN/activations.h5; ideally a held-out one)"""
    samples: int = field(default=64, metadata=at_least(1))
    """cached samples for the spliced CE/KL evaluation"""
    questions: int = 100
    """organism VQA with the SAE spliced in: held-out questions per task (0: skip)"""
    max_rows: int | None = None
    """rows for the reconstruction metrics (none: all)"""
    json: bool = False
    """print eval.json"""


def evaluate_sae(cfg: EvalConfig) -> dict:
    from interp.cache.reader import ActivationReader
    from interp.infra.runinfo import write_run_info
    from saes.sae import SAE

    layout = RunLayout.of(cfg.run)
    cache = Path(cfg.cache) if cfg.cache else layout.cache
    sae = SAE.load(layout.sae)
    with ActivationReader(cache) as reader:
        sae.check_width(torch.zeros(1, reader.d))
        rec = reconstruction_metrics(sae, reader, max_rows=cfg.max_rows)
        density = rec.pop("density")
        result = {"sae": str(layout.sae), "cache": str(cache), **rec}
        if reader.meta.get("module_path"):
            result["spliced"] = spliced_metrics(sae, reader, n_samples=cfg.samples)
            vqa = vqa_with_sae(sae, reader, n=cfg.questions) if cfg.questions else None
            if vqa:
                result["vqa"] = vqa
    layout.eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(layout.eval, result, indent=1)
    write_run_info(layout.run_info("eval"), {"command": "eval", "config": asdict(cfg)})
    _figures(density, result["rows"], layout)
    return result


def _figures(density: np.ndarray, rows: int, layout: RunLayout) -> None:
    """density.html (plotly.js inside) and density.png, and density.json for the app."""
    from interp.infra.durable import write_text
    from interp.infra.plots import write_figure
    from saes.figures import density_histogram

    fig = density_histogram(density, rows)
    write_figure(fig, layout.density_figure("html"))
    write_text(layout.density_figure("json"), fig.to_json())


def _report(r: dict, cfg: EvalConfig) -> None:
    if cfg.json:
        print(json.dumps(r))
        return
    print(f"FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}  dead {r['dead_fraction']:.1%}  dense {r['dense_fraction']:.1%}")
    if "spliced" in r:
        s = r["spliced"]
        print(f"CE clean {s['ce_clean']:.4f}  spliced {s['ce_spliced']:.4f}  zero-ablated {s['ce_zero_ablated']:.4f}  "
              f"recovered {s['ce_loss_recovered']:.3f}  KL {s['kl_spliced']:.4f} (zero-abl. {s['kl_zero_ablated']:.4f})")
    if "vqa" in r:
        for task in r["vqa"]["clean"]:
            print(f"VQA {task:8s} clean {r['vqa']['clean'][task]:.3f}  with SAE {r['vqa']['spliced'][task]:.3f}")


COMMANDS = [Command("eval", EvalConfig, evaluate_sae, "evaluate the run's SAE: FVU, L0, dead/dense, CE recovered, KL, "
                    "organism VQA", report=_report)]
