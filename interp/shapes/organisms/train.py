"""Train a shapes-world organism: a short vision pretraining, then packed multi-turn VQA.

What made this work (see docs/organisms.md for the record):
- the vision tower learns at a fraction of the LLM's rate, else it collapses to
  image-independent answers;
- an image-level objective on mean-pooled image tokens first: which colours and shapes
  are present, and which grid cells are occupied. Shape becomes readable, and each token
  learns to carry its own position, before the LLM must use either. It is image-level on
  purpose: per-patch colour/shape labels would plant the concepts an SAE should discover;
- several question-answer turns per image, so each image's tokens serve many answers.

Every batch is a pure function of (seed, step), so a resumed run is bit-identical.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from interp.infra.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from interp.infra.identity import check_identity
from interp.infra.records import RecordLog
from interp.shapes.organisms.build import SPECS, build_model, build_processor, build_tokenizer
from interp.shapes.world import WorldConfig, sample_scene, scene_questions

TASK_WEIGHTS = {"caption": 1.0, "color": 2.0, "shape": 2.0, "where": 2.0, "count": 0.5, "exists": 1.5, "region": 1.0}


@dataclass(frozen=True)
class TrainConfig:
    which: str = "subject"
    steps: int = 6000
    batch_images: int = 32
    turns: int = 4  # question-answer turns packed after each image
    region_fraction: float = 0.25  # extra highlighted-region sequences per image (a grounding curriculum)
    lr: float = 2e-3
    vision_lr_scale: float = 0.3
    warmup: int = 200
    weight_decay: float = 0.01
    vision_pretrain_steps: int = 1500
    vision_pretrain_lr: float = 1e-3  # 3e-3 left shape presence at 0.8 accuracy; 1e-3 reaches 0.99
    position_init_std: float = 0.5  # CLIP's 0.02 leaves tokens position-blind: cell occupancy never learned
    seed: int = 0
    checkpoint_every: int = 200
    eval_every: int = 1000
    eval_n: int = 100


# The recipes behind the shipped weights (docs/organisms.md records how they were found).
RECIPES = {
    "subject": TrainConfig(which="subject"),
    "explainer": TrainConfig(which="explainer", region_fraction=0.5, lr=1e-3, steps=4000),
}


def pixel_tensor(images: list) -> torch.Tensor:
    """The organism processor's normalisation ((x/255 - 0.5)/0.5), without its per-image overhead."""
    arr = np.stack([np.asarray(im, np.float32) for im in images]) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


class Batcher:
    """Builds training batches straight from the world, tokenised with the organism's vocabulary."""

    def __init__(self, cfg: TrainConfig, world: WorldConfig):
        self.cfg, self.world = cfg, world
        self.tok = build_tokenizer(world)
        self.vocab = self.tok.get_vocab()
        self.image_id = self.vocab["<image>"]
        self.n_image = world.grid * world.grid
        self.tasks = SPECS[cfg.which].tasks
        self.qa_tasks = [t for t in self.tasks if t != "region"]
        w = np.array([TASK_WEIGHTS[t] for t in self.qa_tasks])
        self.task_p = w / w.sum()

    def ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def sequence(self, qas) -> tuple[list[int], list[int]]:
        ids = [self.tok.bos_token_id] + [self.image_id] * self.n_image
        labels = [-100] * len(ids)
        for qa in qas:
            q, a = self.ids(qa.question), self.ids(qa.answer) + [self.tok.eos_token_id]
            ids += q + a
            labels += [-100] * len(q) + a
        return ids, labels

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, step])
        images, seqs = [], []
        for j in range(cfg.batch_images):
            scene = sample_scene(self.world, step * cfg.batch_images + j, "train", cfg.seed)
            qas, seen = [], set()
            for _ in range(cfg.turns * 3):
                if len(qas) == cfg.turns:
                    break
                task = str(rng.choice(self.qa_tasks, p=self.task_p))
                for qa in scene_questions(scene, rng, (task,)):
                    if qa.question not in seen:
                        seen.add(qa.question)
                        qas.append(qa)
            images.append(scene.render())
            seqs.append(self.sequence(qas))
            if "region" in self.tasks and rng.random() < cfg.region_fraction:
                (qa,) = scene_questions(scene, rng, ("region",))
                images.append(scene.render(highlight=qa.highlight))
                seqs.append(self.sequence([qa]))
        return self.collate(images, seqs)

    def collate(self, images, seqs) -> dict[str, torch.Tensor]:
        L = max(len(s[0]) for s in seqs)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(seqs), L), pad)
        labels = torch.full((len(seqs), L), -100)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": pixel_tensor(images)}

    def presence_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and image-level multi-hot targets: colours and shapes present, cells occupied."""
        concepts, g = self.world.concepts, self.world.grid
        scenes = [sample_scene(self.world, 10_000_000 + step * self.cfg.batch_images * 2 + j, "train", self.cfg.seed)
                  for j in range(self.cfg.batch_images * 2)]
        y = torch.zeros(len(scenes), len(concepts) + g * g)
        for i, s in enumerate(scenes):
            for o in s.objects:
                y[i, concepts.index(o.color)] = 1
                y[i, concepts.index(o.shape)] = 1
                y[i, len(concepts) + o.row * g + o.col] = 1
        return pixel_tensor([s.render() for s in scenes]), y


def image_token_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                         vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


def vision_pretrain(model, batcher: Batcher, cfg: TrainConfig) -> float:
    """Image-level presence classification on mean-pooled image tokens; returns the final loss."""
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(batcher.world.concepts) + batcher.world.grid ** 2)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=cfg.vision_pretrain_lr)
    loss = torch.tensor(0.0)
    for step in tqdm(range(cfg.vision_pretrain_steps), desc="vision pretrain", mininterval=2):
        x, y = batcher.presence_batch(step)
        logits = head(image_token_features(model, x).mean(1))
        loss = F.binary_cross_entropy_with_logits(logits, y)
        if (step + 1) % 500 == 0:
            acc = ((logits > 0) == (y > 0)).float().mean(0)
            n = len(batcher.world.concepts)
            tqdm.write(f"vision pretrain step {step + 1}: loss {loss.item():.4f}, concept acc {acc[:n].mean():.3f}, "
                       f"occupancy acc {acc[n:].mean():.3f}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n]
    rest = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    return torch.optim.AdamW(
        [{"params": rest, "lr": cfg.lr}, {"params": vision, "lr": cfg.lr * cfg.vision_lr_scale}],
        weight_decay=cfg.weight_decay, betas=(0.9, 0.98),
    )


def train(cfg: TrainConfig, out: str | Path, world: WorldConfig = WorldConfig(), threads: int | None = None) -> Path:
    """Train into `out` (checkpoints under out/checkpoint); re-running resumes where it stopped."""
    from interp.shapes.organisms.eval import evaluate

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    model = build_model(SPECS[cfg.which], world, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=cfg.position_init_std)
    processor = build_processor(world)
    batcher = Batcher(cfg, world)
    opt = make_optimizer(model, cfg)
    run_meta = {"train_config": asdict(cfg), "world": world.to_json(), "spec": SPECS[cfg.which].to_json()}
    start = 0
    found = find_checkpoint(ckpt_dir)
    if found:
        state, meta = load_checkpoint(found, opt)
        check_identity(meta["run"], run_meta, f"checkpoint {found}", "use another --out or delete it")
        model.load_state_dict(state)
        start = meta["step"]
        print(f"resuming from step {start}")
    else:
        loss = vision_pretrain(model, batcher, cfg)
        print(f"vision pretraining done, presence loss {loss:.4f}")
        save_checkpoint(ckpt_dir, model.state_dict(), opt, {"step": 0, "run": run_meta})
    log = RecordLog(out / "train_log.jsonl", durable=False)  # a record every step; the checkpoint is the durable state
    log.keep(lambda r: r["step"] <= start)  # what was logged after the checkpoint is redone
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.which}", mininterval=2)
    t0 = time.time()
    for step in bar:
        for g, base in zip(opt.param_groups, (cfg.lr, cfg.lr * cfg.vision_lr_scale)):
            g["lr"] = base * lr_at(step, cfg)
        # the batch seed is the step, so data never depends on when the run was resumed
        loss = model(**batcher.batch(step)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        rec = {"step": step + 1, "loss": round(loss.item(), 5), "elapsed": round(time.time() - t0, 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            rec["eval"] = evaluate(model, processor, SPECS[cfg.which].tasks, n=cfg.eval_n, split="val", seed=cfg.seed)
            model.train()
            tqdm.write(json.dumps(rec))
        log.append(rec)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(ckpt_dir, model.state_dict(), opt, {"step": step + 1, "run": run_meta})
    model.eval()
    final = out / "model"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "training.json").write_text(json.dumps(run_meta, indent=1))
    return final
