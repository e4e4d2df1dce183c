"""`interp organism train|eval`: the shapes-world model organisms."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from interp.infra.cli_config import Command, choices
from interp.shapes.organisms import ORGANISMS

WHICH = sorted(set(ORGANISMS.values()))


@dataclass
class OrganismTrainConfig:
    """`interp organism train`: train an organism from its recipe (resumable: re-run to continue)."""

    which: str = field(default="subject", metadata=choices(WHICH))
    """which organism"""
    out: str | None = None
    """training directory (none: runs/organism-WHICH)"""
    steps: int | None = None
    """training steps (none: the recorded recipe's)"""
    vision_steps: int | None = None
    """vision pretraining steps (none: the recorded recipe's)"""
    vision_targets: str | None = field(default=None, metadata=choices(["cell", "patch", "region"]))
    """what the vision pretraining predicts: per position cell, per image token its object, or that and its
    part or background (region) (none: the recipe's)"""
    vision_head_loss: str | None = field(default=None, metadata=choices(["ce", "mse"]))
    """the vision pretraining heads' loss: softmax (ce) or one-hot regression (mse; a direction per value)
    (none: the recipe's)"""
    vision_lr_scale: float | None = None
    """the vision tower's learning rate in the LM stage, as a multiple of the LM's (0: frozen; none: the
    recipe's)"""
    projector_lr_scale: float | None = None
    """the projector's, likewise (with the tower's at 0, the pretraining's geometry reaches the LM unchanged;
    none: the recipe's)"""
    selector_last: bool = False
    """phrase the shape question with the colour word last ("what shape is red ?")"""
    attention_supervision: float | None = None
    """weight of the focus loss (answers attend to the patches of what the question is about; none: the
    recipe's)"""
    seed: int = 0
    """seed of the weights and of the data stream"""
    threads: int | None = None
    """torch CPU threads (1 per process when running two)"""
    install: bool = False
    """copy the final model into the package's shipped weights"""


def organism_train(cfg: OrganismTrainConfig) -> Path:
    import shutil
    from dataclasses import replace

    from interp.shapes.organisms import WEIGHTS
    from interp.shapes.organisms.train import RECIPES, train

    recipe = replace(RECIPES[cfg.which], seed=cfg.seed)
    if cfg.steps:
        recipe = replace(recipe, steps=cfg.steps)
    if cfg.vision_steps:
        recipe = replace(recipe, vision_pretrain_steps=cfg.vision_steps)
    if cfg.vision_targets:
        recipe = replace(recipe, vision_targets=cfg.vision_targets)
    if cfg.vision_head_loss:
        recipe = replace(recipe, vision_head_loss=cfg.vision_head_loss)
    if cfg.vision_lr_scale is not None:
        recipe = replace(recipe, vision_lr_scale=cfg.vision_lr_scale)
    if cfg.projector_lr_scale is not None:
        recipe = replace(recipe, projector_lr_scale=cfg.projector_lr_scale)
    if cfg.selector_last:
        recipe = replace(recipe, selector_last=True)
    if cfg.attention_supervision is not None:
        recipe = replace(recipe, attention_supervision=cfg.attention_supervision)
    final = train(recipe, Path(cfg.out or f"runs/organism-{cfg.which}"), threads=cfg.threads)
    print(f"trained model: {final}")
    if cfg.install:
        name = f"shapes-{cfg.which}"
        dest = WEIGHTS / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(final, dest)
        print(f"installed as {name}: {dest}")
    return final


@dataclass
class OrganismEvalConfig:
    """`interp organism eval`: held-out accuracy per task."""

    which: str = field(default="subject", metadata=choices(WHICH))
    """which organism"""
    model: str | None = None
    """a trained model directory instead of the shipped one"""
    questions: int = 200
    """held-out questions per task"""
    seed: int = 0
    """seed of the held-out split"""
    reach_layer: int | None = None
    """also measure image_token_reach at this LLM layer (the share of answers that change when the
    image tokens' output there is swapped with another image's)"""
    selection: bool = False
    """also measure selection on two-object scenes: how often "what shape is the X object ?" and "what color
    is the S ?" name the asked object's attribute, and how often the other object's"""
    json: bool = False
    """print one JSON object"""


def organism_eval(cfg: OrganismEvalConfig) -> dict[str, float]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from interp.shapes.organisms import organism_path, organism_world
    from interp.shapes.organisms.build import SPECS
    from interp.shapes.organisms.eval import evaluate, image_token_reach, selection

    path = Path(cfg.model) if cfg.model else organism_path(f"shapes-{cfg.which}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="float32").eval()
    processor = AutoProcessor.from_pretrained(path)
    world = organism_world(path)  # its own world: a subject trained with outlined stripes is asked about those
    acc = evaluate(model, processor, SPECS[cfg.which].eval_tasks, n=cfg.questions, split="test", seed=cfg.seed,
                   world=world)
    if cfg.reach_layer is not None:
        acc["image_token_reach"] = image_token_reach(model, processor, cfg.reach_layer, n=cfg.questions,
                                                     seed=cfg.seed, world=world)
    if cfg.selection:
        acc.update(selection(model, processor, n=cfg.questions, seed=cfg.seed, world=world))
    return acc


def _report_eval(acc: dict[str, float], cfg: OrganismEvalConfig) -> None:
    if cfg.json:
        print(json.dumps(acc))
    else:
        for task, a in acc.items():
            print(f"{task:10s} {a:.3f}")


GROUPS = {"organism": "train or evaluate the shapes-world model organisms"}
COMMANDS = [
    Command("organism train", OrganismTrainConfig, organism_train, "train an organism (resumable: re-run to continue)"),
    Command("organism eval", OrganismEvalConfig, organism_eval, "held-out accuracy per task", report=_report_eval),
]
