"""Train a shapes-world organism: a vision pretraining per position cell, then packed multi-turn QA.

What made this work (docs/organisms.md keeps the record, failures included):
- the vision tower learns at a fraction of the LLM's rate, else it collapses to
  image-independent answers; position embeddings start large;
- a vision pretraining on what object each image token shows (`vision_targets="patch"`) or each
  position cell holds, from the mean of the cell's tokens ("cell"). Image-level presence targets
  left shape at chance on v2; per-cell targets made shape readable only from pooled tokens, which
  an LM selecting an object by colour could not use; the subject's targets name no parts, edges,
  backgrounds or sub-cell places, which stay for its SAE to find. The explainer's ("region") also name
  the part and the empty background's tone and texture: it is the perceiver, and its region
  descriptions name them (without them it read texture at chance);
- its heads regress one-hot codes (`vision_head_loss="mse"`), so each colour, shape, size and fill
  gets a direction of its own; softmax heads let the v3 tower put its 8 colours on one 2-D circle,
  which an SAE can only cut into arcs. The tower and projector then stay frozen in the LM stage
  (`vision_lr_scale=projector_lr_scale=0`), which otherwise collapsed that code to one direction;
- several question-answer turns per image, so each image's tokens serve many answers.
- a focus loss (`attention_supervision`): at every answer position two heads look at the question's
  words that name its object, a readout checks the word arrived, and two heads after the SAE's layer
  look at that object's patches. Without it no subject selected an object by its colour word.

Every batch is a pure function of (seed, step), so a resumed run is bit-identical.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from interp.infra.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from interp.infra.identity import check_identity
from interp.shapes import world as w
from interp.shapes.organisms.build import IMAGE_TOKEN, SPECS, build_model, build_processor, build_tokenizer
from interp.shapes.organisms.eval import evaluate

TASK_WEIGHTS = {"color": 1.0, "shape": 1.0, "size": 1.0, "fill": 1.0, "at": 1.5, "where": 1.0, "count": 0.5,
                "exists": 1.5, "relation": 1.5, "letter": 0.7, "caption": 1.0, "region": 1.0,
                "judge": 2.0}


def one_hot_mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error of a linear head against the one-hot code of `y` (-100: no target), per target row.

    A least-squares readout of one-hot codes is exact only if the class means are affinely independent,
    so each value gets a direction of its own; a softmax head is content with any linearly separable
    layout, and the v3 tower put its 8 colours on one 2-D circle (docs/organisms.md)."""
    logits, y = logits.flatten(0, -2), y.flatten()
    m = y >= 0
    if not m.any():
        return logits.sum() * 0
    return (logits[m] - F.one_hot(y[m], logits.shape[-1]).to(logits.dtype)).pow(2).sum(-1).mean()


VISION_TARGETS = ("cell", "patch", "region")
HEAD_LOSSES = {"ce": lambda logits, y: F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=-100),
               "mse": one_hot_mse}


@dataclass(frozen=True)
class TrainConfig:
    which: str = "subject"
    steps: int = 5000
    batch_images: int = 32
    turns: int = 5  # question-answer turns packed after each image
    region_fraction: float = 0.2  # extra highlighted-region sequences per image
    lr: float = 2e-3
    vision_lr_scale: float = 0.3  # the LM stage's learning rate of the vision tower, as a multiple of lr's
    projector_lr_scale: float = 1.0  # and of the projector (both 0: the pretraining's geometry reaches the LM)
    warmup: int = 200
    weight_decay: float = 0.01
    vision_pretrain_steps: int = 3000
    vision_pretrain_lr: float = 1e-3
    vision_lr_end: float = 5e-5  # cosine decay to this: at a constant rate shape plateaued at 0.70-0.78
    vision_min_objects: int = 3  # dense scenes: more labelled cells per image
    vision_gate_shape: float = 0.97  # held-out cell-level shape accuracy that ends the pretraining early
    vision_check_every: int = 100  # steps between held-out checks (and vision checkpoints)
    vision_targets: str = "cell"  # "cell": per position cell, from its mean token; "patch": every token
    # names its object; "region": also its part (edge, interior) or, on an empty patch, the background's
    # tone and texture: all a region description names (explainer only; the subject's SAE must find these)
    vision_head_loss: str = "ce"  # "ce": softmax heads; "mse": linear regression of each attribute's one-hot
    # code, which needs a direction per value (softmax heads let 8 colours share a 2-D circle)
    position_init: str = "sincos"  # "sincos": 2D sine-cosine (MAE's); "normal": random
    position_init_std: float = 0.5
    striped_outline: bool = True  # the world's rendering: striped objects keep their contour
    selector_last: bool = False  # the world's phrasing: "what shape is red ?" (see WorldConfig)
    attention_supervision: float = 0.0  # weight of the focus loss: heads 0-1 of `focus_layers` attend, at
    # every answer position, to the patches of what the question is about (`QA.focus`); 0: off
    focus_layers: tuple[int, ...] = (5, 6)  # after the SAE's layer 4, so answers still read the image there
    cue_layers: tuple[int, ...] = (2, 3)  # heads 0-1 here attend to the question's words naming each thing
    # (`QA.cues`): with the image hop alone, selection by a colour word three tokens back did not form
    cue_readout: float = 1.0  # weight of a linear readout of the naming word from the answer positions' residual
    # after `cue_layers`: the text hop's heads looked at the word but did not carry it (docs/organisms.md)
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_n: int = 50

    def __post_init__(self) -> None:
        if self.vision_targets not in VISION_TARGETS:
            raise ValueError(f"vision_targets {self.vision_targets!r}: use {', '.join(map(repr, VISION_TARGETS))}")
        if self.vision_head_loss not in HEAD_LOSSES:
            raise ValueError(f"vision_head_loss {self.vision_head_loss!r}: use {' or '.join(map(repr, HEAD_LOSSES))}")


RECIPES = {  # the shipped organisms' (docs/organisms.md)
    "subject": TrainConfig(which="subject", steps=2500, batch_images=24, turns=6, vision_pretrain_steps=2500,
                           vision_targets="patch", vision_head_loss="mse", vision_lr_scale=0.0, projector_lr_scale=0.0,
                           attention_supervision=0.5),
    "explainer": TrainConfig(which="explainer", steps=4000, batch_images=12, turns=2, region_fraction=2.0,
                             lr=1.5e-3, vision_pretrain_steps=2500, vision_targets="region", vision_head_loss="mse",
                             attention_supervision=0.5),
}


def pixel_tensor(images: list) -> torch.Tensor:
    """The processor's normalisation ((x/255 - 0.5)/0.5) without its per-image overhead."""
    arr = np.stack([np.asarray(im, np.float32) for im in images]) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


class Batcher:
    """Training batches built straight from the world, tokenised with the organism's vocabulary."""

    def __init__(self, cfg: TrainConfig, world: w.WorldConfig):
        self.cfg, self.world = cfg, world
        self.tok = build_tokenizer(world)
        self.vocab = self.tok.get_vocab()
        self.n_image = world.patches ** 2
        self.tasks = SPECS[cfg.which].tasks
        self.qa_tasks = [t for t in self.tasks if t != "region"]
        p = np.array([TASK_WEIGHTS[t] for t in self.qa_tasks])
        self.task_p = p / p.sum()

    def ids(self, text: str) -> list[int]:
        return [self.vocab[x] for x in text.split()]

    def sequence(self, qas) -> tuple[list[int], list[int], list[tuple[range, tuple, tuple]]]:
        """Token ids, labels, and (only when the focus loss is on) per question with a focus the positions
        whose outputs predict its answer words (the question's last token to the answer's second to last),
        with that focus and the positions of the question's words that name each thing of it."""
        ids = [self.tok.bos_token_id] + [self.vocab[IMAGE_TOKEN]] * self.n_image
        labels = [-100] * len(ids)
        looks = []
        for qa in qas:
            q, a = self.ids(qa.question), self.ids(qa.answer) + [self.tok.eos_token_id]
            start = len(ids)
            ids += q + a
            labels += [-100] * len(q) + a
            if qa.focus and self.cfg.attention_supervision > 0:
                first = start + len(q) - 1
                cues = tuple(tuple(start + j for j in word_span(qa.question.split(), c.split())) for c in qa.cues)
                looks.append((range(first, first + len(a) - 1), qa.focus, cues))
        return ids, labels, looks

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, step])
        images, seqs = [], []
        for j in range(cfg.batch_images):
            scene = w.sample_scene(self.world, step * cfg.batch_images + j, "train", cfg.seed)
            qas, seen = [], set()
            for _ in range(cfg.turns * 3):
                if len(qas) == cfg.turns:
                    break
                task = str(rng.choice(self.qa_tasks, p=self.task_p))
                for qa in w.scene_questions(scene, rng, (task,)):
                    if qa.question not in seen:
                        seen.add(qa.question)
                        qas.append(qa)
            if qas:
                images.append(scene.render())
                seqs.append(self.sequence(qas))
            if "region" in self.tasks:
                n_region = int(cfg.region_fraction) + (rng.random() < cfg.region_fraction % 1)
                for _ in range(n_region):
                    (qa,) = w.scene_questions(scene, rng, ("region",))
                    images.append(scene.render(highlight=qa.highlight))
                    seqs.append(self.sequence([qa]))
        return collate(images, seqs, self.tok.pad_token_id)

    def cell_batch(self, step: int, n: int = 64, split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Dense scenes and, per position cell, the attributes of the object there (-100: the cell is empty)."""
        g = self.world.grid
        scenes = self.dense_scenes(step, n, split)
        y = {k: torch.full((n, g * g), -100) for k in CELL_TARGETS}
        y["occupied"] = torch.zeros(n, g * g)
        for i, s in enumerate(scenes):
            for o in s.objects:
                c = o.row * g + o.col
                y["occupied"][i, c] = 1
                for k, values in cell_targets(self.world).items():
                    y[k][i, c] = values.index(getattr(o, k))
        return pixel_tensor([s.render() for s in scenes]), y

    def dense_scenes(self, step: int, n: int, split: str) -> list[w.Scene]:
        """The vision pretraining's scenes: at least `vision_min_objects` objects, so more cells are labelled."""
        dense = replace(self.world, min_objects=max(self.world.min_objects, self.cfg.vision_min_objects))
        return [w.sample_scene(dense, 10_000_000 + step * n + j, split, self.cfg.seed) for j in range(n)]

    def targets(self, step: int, n: int = 64, split: str = "train"):
        """The vision pretraining's batch, per cell or per patch (`TrainConfig.vision_targets`)."""
        return (self.cell_batch if self.cfg.vision_targets == "cell" else self.patch_batch)(step, n, split)

    def patch_batch(self, step: int, n: int = 64, split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Dense scenes and, per patch, the attributes of the object covering most of it (-100: none
        covers PATCH_OBJECT of it) and the position cell the patch lies in. With `vision_targets="region"`
        also the part of the object (interior where one covers INTERIOR of the patch) and, on an empty patch
        (under `world.EMPTY` covered), the background's tone and texture."""
        scenes = self.dense_scenes(step, n, split)
        t = self.n_image
        region = self.cfg.vision_targets == "region"
        y = {k: torch.full((n, t), -100) for k in (*CELL_TARGETS, *(REGION_TARGETS if region else ()))}
        y["occupied"] = torch.zeros(n, t)
        targets = cell_targets(self.world)
        for i, s in enumerate(scenes):
            fracs = np.stack([f.flatten() for f in s.object_patch_fractions()])
            cover = fracs.max(0)
            owned, owner = torch.from_numpy(cover >= PATCH_OBJECT), fracs.argmax(0)
            for k, values in targets.items():
                codes = torch.tensor([values.index(getattr(o, k)) for o in s.objects])
                y[k][i] = torch.where(owned, codes[owner], -100)
            y["occupied"][i] = owned.float()
            if region:
                interior = torch.from_numpy(cover >= w.INTERIOR).long()
                y["part"][i] = torch.where(owned, interior, -100)
                empty = torch.from_numpy(fracs.sum(0) < w.EMPTY)
                for k, value in (("tone", s.tone), ("texture", s.texture)):
                    y[k][i] = torch.where(empty, REGION_TARGETS[k].index(value), -100)
        return pixel_tensor([s.render() for s in scenes]), y


CELL_TARGETS = ("color", "shape", "size", "fill")
PATCH_OBJECT = 0.1  # a patch this covered by an object is that object's, for the per-patch targets
REGION_TARGETS = {"part": list(w.PARTS), "tone": list(w.TONES), "texture": list(w.TEXTURES)}


def cell_targets(world: w.WorldConfig) -> dict[str, list[str]]:
    return {"color": list(world.colors), "shape": list(world.shapes), "size": list(w.SIZES), "fill": list(w.FILLS)}


def word_span(words: list[str], phrase: list[str]) -> range:
    """Where `phrase` last occurs in `words`."""
    for j in range(len(words) - len(phrase), -1, -1):
        if words[j: j + len(phrase)] == phrase:
            return range(j, j + len(phrase))
    raise ValueError(f"{' '.join(phrase)!r} is not in {' '.join(words)!r}")


def collate(images, seqs, pad: int) -> dict[str, torch.Tensor]:
    """The model's inputs, plus `focus` [batch, FOCUS_HEADS, length, image tokens]: where each
    supervised head should attend at each answer position (rows sum to 1; zero rows are not supervised),
    and `cue` [batch, FOCUS_HEADS, length, length]: the same for the text hop, over the question's words,
    and `cue_word` [batch, length]: the (last) word naming the first thing, at those positions (-100: none)."""
    L = max(len(s[0]) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad)
    labels = torch.full((len(seqs), L), -100)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    focus = cue = None
    for i, (ids, lab, looks) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
        for positions, things, cues in looks:
            if focus is None:
                focus = torch.zeros(len(seqs), FOCUS_HEADS, L, things[0].size)
                cue = torch.zeros(len(seqs), FOCUS_HEADS, L, L)
                cue_word = torch.full((len(seqs), L), -100)
            rows = slice(positions.start, positions.stop)
            if cues:
                cue_word[i, rows] = ids[cues[0][-1]]
            for h in range(FOCUS_HEADS):  # head h looks at thing h (the last one when there are fewer)
                target = torch.as_tensor(things[min(h, len(things) - 1)].flatten(), dtype=torch.float32)
                focus[i, h, rows] = target / target.sum()
                if cues:
                    words = list(cues[min(h, len(cues) - 1)])
                    cue[i, h, rows, words] = 1 / len(words)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": pixel_tensor(images)}
    if focus is not None:
        batch["focus"], batch["cue"], batch["cue_word"] = focus, cue, cue_word
    return batch


FOCUS_HEADS = 2  # a relation is about two things


def focus_loss(attentions, focus: torch.Tensor, layers: tuple[int, ...], first_image: int = 1,
               cue: torch.Tensor | None = None, cue_layers: tuple[int, ...] = ()) -> torch.Tensor:
    """Cross-entropy of the supervised heads' attention over the image tokens against `focus` (at
    `layers`), and over the question's words against `cue` (at `cue_layers`): the two hops of a question
    that names its object, first to the naming words, then to the object.

    Raw attention, not renormalised over the image: the head learns to put its weight on the
    question's object and nowhere else, a retrieval head. It leaves the image tokens' own
    activations (what the SAE reads) to the LM loss."""
    n = focus.shape[-1]
    rows = focus.sum(-1) > 0
    terms = []
    for layer in layers:
        att = attentions[layer][:, :FOCUS_HEADS, :, first_image: first_image + n]
        terms.append(-(focus * torch.log(att + 1e-6)).sum(-1)[rows].mean())
    rows = cue.sum(-1) > 0 if cue is not None else None
    for layer in cue_layers if rows is not None and rows.any() else ():
        terms.append(-(cue * torch.log(attentions[layer][:, :FOCUS_HEADS] + 1e-6)).sum(-1)[rows].mean())
    return torch.stack(terms).mean()


def image_token_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                         vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


def cell_of_tokens(world: w.WorldConfig) -> torch.Tensor:
    """[patches**2]: the position cell each image token lies in, row-major."""
    n, g = world.patches, world.grid
    return torch.tensor([(r * world.patch // world.cell) * g + (c * world.patch // world.cell)
                         for r in range(n) for c in range(n)])


def attribute_losses(heads, x: torch.Tensor, y: dict[str, torch.Tensor], loss: torch.Tensor,
                     acc: dict[str, float], head_loss=HEAD_LOSSES["ce"]) -> tuple[torch.Tensor, dict[str, float]]:
    """Adds each attribute head's `head_loss` (targets -100: no object) to `loss`, its accuracy to `acc`."""
    for k, head in heads.items():
        logits = head(x)
        loss = loss + head_loss(logits, y[k])
        m = y[k] >= 0
        acc[k] = float((logits.argmax(-1)[m] == y[k][m]).float().mean()) if m.any() else float("nan")
    return loss, acc


class CellHeads(torch.nn.Module):
    """Per position cell: the mean of its image tokens -> the attributes of the object there."""

    def __init__(self, width: int, world: w.WorldConfig, head_loss: str = "ce"):
        super().__init__()
        self.head_loss = HEAD_LOSSES[head_loss]
        g = world.grid
        cell_of = cell_of_tokens(world)
        self.register_buffer("pool", torch.stack([(cell_of == k).float() / (cell_of == k).sum() for k in range(g * g)]))
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in cell_targets(world).items()})
        self.occupied = torch.nn.Linear(width, 1)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ct,btd->bcd", self.pool, tokens)

    def forward(self, tokens: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cells = self.pooled(tokens)
        loss = F.binary_cross_entropy_with_logits(self.occupied(cells).squeeze(-1), y["occupied"])
        return attribute_losses(self.heads, cells, y, loss, {}, self.head_loss)


class PatchHeads(torch.nn.Module):
    """Per image token: the attributes of the object it shows, and its position cell.

    Cell-level targets leave shape readable only from an object's pooled tokens (0.70-0.92), and an
    LM that selects an object by its colour reads a weak, mixed shape there (docs/organisms.md). With
    every token of an object naming it, any token a colour-selected head lands on carries the shape."""

    def __init__(self, width: int, world: w.WorldConfig, head_loss: str = "ce", region: bool = False):
        super().__init__()
        self.head_loss = HEAD_LOSSES[head_loss]
        self.register_buffer("cell_of", cell_of_tokens(world))
        targets = {**cell_targets(world), **(REGION_TARGETS if region else {})}
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in targets.items()})
        self.occupied = torch.nn.Linear(width, 1)
        self.cell = torch.nn.Linear(width, world.grid ** 2)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def forward(self, tokens: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.binary_cross_entropy_with_logits(self.occupied(tokens).squeeze(-1), y["occupied"])
        cell_logits = self.cell(tokens)
        loss = loss + self.head_loss(cell_logits, self.cell_of.expand(tokens.shape[0], -1))
        acc = {"cell": float((cell_logits.argmax(-1) == self.cell_of).float().mean())}
        return attribute_losses(self.heads, tokens, y, loss, acc, self.head_loss)


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """2D sine-cosine position embeddings (MAE's), [grid*grid, width]: half the width per axis."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angle = axis[:, None] * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    emb = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(emb, (0, width - emb.shape[1])).float()


def init_positions(model, cfg: TrainConfig, world: w.WorldConfig) -> None:
    """Position embeddings at std `position_init_std`: CLIP's 0.02 is ~20x below the patch
    embeddings, which left image tokens position-blind (docs/organisms.md)."""
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        if cfg.position_init == "normal":
            torch.nn.init.normal_(weight, std=cfg.position_init_std)
        elif cfg.position_init == "sincos":
            emb = sincos_positions(world.patches, weight.shape[1])
            emb = (emb - emb.mean()) / emb.std() * cfg.position_init_std
            weight.zero_()
            weight[weight.shape[0] - emb.shape[0]:] = emb  # the class token (first) stays at zero
        else:
            raise ValueError(f"position_init {cfg.position_init!r}: use 'sincos' or 'normal'")


@torch.no_grad()
def cell_accuracy(model, heads, batcher: Batcher, n: int = 256) -> dict[str, float]:
    """Held-out (val split) accuracy per attribute, per cell or per patch: the vision pretraining's gate."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for b in range(n // 64):
        x, y = batcher.targets(b, 64, split="val")
        cells = heads.pooled(image_token_features(model, x))
        for k, head in heads.heads.items():
            m = y[k] >= 0
            right[k] = right.get(k, 0) + int((head(cells).argmax(-1)[m] == y[k][m]).sum())
            total[k] = total.get(k, 0) + int(m.sum())
    return {k: right[k] / max(1, total[k]) for k in right}


def vision_lr(step: int, cfg: TrainConfig) -> float:
    """100 warm-up steps, then cosine decay from vision_pretrain_lr to vision_lr_end."""
    if step < 100:
        return cfg.vision_pretrain_lr * (step + 1) / 100
    t = (step - 100) / max(1, cfg.vision_pretrain_steps - 100)
    return cfg.vision_lr_end + (cfg.vision_pretrain_lr - cfg.vision_lr_end) * 0.5 * (1 + math.cos(math.pi * t))


def vision_pretrain(model, batcher: Batcher, cfg: TrainConfig, ckpt: Path) -> dict[str, float]:
    """What object each image token shows (or each position cell holds), with the tokens' cell.

    Shape in v2 spans several 8-px patches and comes in three fills, which image-level presence
    targets on pooled tokens did not teach in 600 steps (shape at chance; docs/organisms.md). Only
    the "region" targets (the explainer's) name parts and backgrounds: the subject's SAE must find those.
    Resumable from `ckpt`."""
    torch.manual_seed(cfg.seed)
    width = model.config.text_config.hidden_size
    heads = (CellHeads(width, batcher.world, cfg.vision_head_loss) if cfg.vision_targets == "cell" else
             PatchHeads(width, batcher.world, cfg.vision_head_loss, region=cfg.vision_targets == "region"))
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=cfg.vision_pretrain_lr)
    both = torch.nn.ModuleDict({"model": model, "heads": heads})
    meta = _load(ckpt, both, opt)
    if meta and meta.get("gated"):
        return meta["held_out"]
    start = meta["step"] if meta else 0
    acc: dict[str, float] = {}
    bar = tqdm(range(start, cfg.vision_pretrain_steps), initial=start, total=cfg.vision_pretrain_steps,
               desc="vision pretrain", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = vision_lr(step, cfg)
        x, y = batcher.targets(step)
        loss, acc = heads(image_token_features(model, x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(both.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", shape=f"{acc['shape']:.2f}")
        if (step + 1) % cfg.vision_check_every == 0 or step + 1 == cfg.vision_pretrain_steps:
            held_out = cell_accuracy(model, heads, batcher)
            gated = held_out["shape"] >= cfg.vision_gate_shape
            tqdm.write(json.dumps({"vision_pretrain_step": step + 1, "loss": round(loss.item(), 4),
                                   **{k: round(v, 3) for k, v in acc.items()},
                                   "held_out": {k: round(v, 3) for k, v in held_out.items()}}))
            _save(ckpt, both, opt, {"step": step + 1, "held_out": held_out, "gated": gated})
            acc = held_out
            if gated:
                break
    return acc


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


PARAM_GROUPS = ("vision_tower", "multi_modal_projector")  # the LM stage's own learning rates; the rest: lr


def group_lrs(cfg: TrainConfig) -> tuple[float, float, float]:
    """Base learning rates of `make_optimizer`'s groups: the LLM (and readout), the tower, the projector."""
    return cfg.lr, cfg.lr * cfg.vision_lr_scale, cfg.lr * cfg.projector_lr_scale


def make_optimizer(model, cfg: TrainConfig, extra: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW over three groups (`group_lrs`); a group at lr 0 stays exactly as it is (decoupled decay)."""
    groups = {g: [] for g in ("rest",) + PARAM_GROUPS}
    for n, p in model.named_parameters():
        groups[next((g for g in PARAM_GROUPS if g in n), "rest")].append(p)
    groups["rest"] += list(extra.parameters()) if extra is not None else []
    return torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in zip(groups.values(), group_lrs(cfg))],
                             weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


def _save(path: Path, model, opt, meta: dict) -> None:
    save_checkpoint(path, model.state_dict(), opt, meta)


def _load(path: Path, model, opt) -> dict | None:
    found = find_checkpoint(path)
    if found is None:
        return None
    state, meta = load_checkpoint(found, opt)
    model.load_state_dict(state)
    return meta


def train(cfg: TrainConfig, out: str | Path, world: w.WorldConfig | None = None, threads: int | None = None) -> Path:
    """Train into `out` (checkpoint under out/checkpoint); re-running resumes where it stopped."""
    world = world or w.WorldConfig(striped_outline=cfg.striped_outline, selector_last=cfg.selector_last)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(SPECS[cfg.which], world, seed=cfg.seed)
    readout = None
    if cfg.attention_supervision > 0:
        model.set_attn_implementation("eager")  # the only implementation that returns attention weights
        if cfg.cue_readout > 0:  # trained and checkpointed beside the model, never shipped with it
            text = model.config.text_config
            readout = torch.nn.Linear(text.hidden_size, text.vocab_size)
    torch.manual_seed(cfg.seed)
    init_positions(model, cfg, world)
    processor = build_processor(world)
    batcher = Batcher(cfg, world)
    opt = make_optimizer(model, cfg, readout)
    trained = model if readout is None else torch.nn.ModuleDict({"model": model, "cue_readout": readout})
    run = json.loads(json.dumps({"train_config": asdict(cfg), "world": world.to_json(),
                                 "spec": asdict(SPECS[cfg.which])}))
    meta = _load(out / "checkpoint", trained, opt)
    if meta is not None:
        check_identity(meta["run"], run, f"checkpoint {out / 'checkpoint'}", "use another --out or delete it")
        start = meta["step"]
        print(f"resuming from step {start}", flush=True)
    else:
        acc = vision_pretrain(model, batcher, cfg, out / "vision_checkpoint")
        print(f"vision pretraining done: cell accuracy {acc}", flush=True)
        start = 0
        _save(out / "checkpoint", trained, opt, {"step": 0, "run": run})
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        kept = [x for x in log_path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= start]
        log_path.write_text("".join(x + "\n" for x in kept))
    log = open(log_path, "a")
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.which}", mininterval=10)
    for step in bar:
        for g, base in zip(opt.param_groups, group_lrs(cfg)):
            g["lr"] = base * lr_at(step, cfg)
        batch = batcher.batch(step)
        focus, cue, cue_word = batch.pop("focus", None), batch.pop("cue", None), batch.pop("cue_word", None)
        supervise = focus is not None  # the batcher builds focus targets only when the focus loss is on
        readout_loss = None
        result = model(**batch, output_attentions=supervise, output_hidden_states=supervise)
        loss = result.loss
        if supervise:
            att_loss = focus_loss(result.attentions, focus, cfg.focus_layers, cue=cue,
                                  cue_layers=cfg.cue_layers)
            loss = loss + cfg.attention_supervision * att_loss
            if readout is not None and (cue_word >= 0).any():
                after = result.hidden_states[max(cfg.cue_layers) + 1]
                readout_loss = F.cross_entropy(readout(after).flatten(0, 1), cue_word.flatten())
                loss = loss + cfg.cue_readout * readout_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{result.loss.item():.4f}")
        rec = {"step": step + 1, "loss": round(result.loss.item(), 5), "elapsed": round(time.time() - t0, 1)}
        if supervise:
            rec["focus_loss"] = round(att_loss.item(), 5)
            if readout_loss is not None:
                rec["cue_readout_loss"] = round(readout_loss.item(), 5)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            rec["eval"] = evaluate(model, processor, SPECS[cfg.which].tasks, n=cfg.eval_n, split="val",
                                   seed=cfg.seed, world=world)
            model.train()
            tqdm.write(json.dumps(rec))
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save(out / "checkpoint", trained, opt, {"step": step + 1, "run": run})
    model.eval()
    model.set_attn_implementation("sdpa")
    final = out / "model"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "training.json").write_text(json.dumps(run, indent=1))
    return final
