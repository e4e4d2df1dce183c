"""Build, train and evaluate the shapes-world v2 organisms (subject v2 and explainer v2).

Both are plain `LlavaForConditionalGeneration` models (CLIP vision tower, Llama text model)
with a word-level tokenizer, saved with `save_pretrained` so the Auto classes load them like hub
models. The recipe carries over what worked for v1 (docs/organisms.md): the vision tower learns
at a fraction of the LLM's rate, position embeddings start large, a vision pretraining on
what object each position cell holds (never per-patch labels, which would plant the concepts an
SAE should find), then packed multi-turn QA.

Every batch is a pure function of (seed, step), so a resumed run is bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from interp.shapes import world_v2 as w

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (  # image first: image-token activations never depend on the question
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Spec:
    name: str
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    heads: int
    tasks: tuple[str, ...]


SPECS = {
    "subject": Spec("shapes-subject-v2", 128, 4, 128, 8, 4, w.SUBJECT_TASKS),
    "explainer": Spec("shapes-explainer-v2", 160, 4, 160, 8, 5, w.EXPLAINER_TASKS),
}

TASK_WEIGHTS = {"color": 1.0, "shape": 1.0, "size": 1.0, "fill": 1.0, "at": 1.5, "where": 1.0, "count": 0.5,
                "exists": 1.5, "relation": 1.5, "letter": 0.7, "caption": 1.0, "region": 1.0,
                "judge": 2.0}


@dataclass(frozen=True)
class TrainConfig:
    which: str = "subject"
    steps: int = 5000
    batch_images: int = 32
    turns: int = 5  # question-answer turns packed after each image
    region_fraction: float = 0.2  # extra highlighted-region sequences per image
    lr: float = 2e-3
    vision_lr_scale: float = 0.3
    warmup: int = 200
    weight_decay: float = 0.01
    vision_pretrain_steps: int = 3000
    vision_pretrain_lr: float = 1e-3
    position_init_std: float = 0.5
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_n: int = 50


RECIPES = {
    "subject": TrainConfig(which="subject", steps=5000, batch_images=24, turns=6),
    "explainer": TrainConfig(which="explainer", steps=4000, batch_images=12, turns=2, region_fraction=2.0,
                             lr=1.5e-3),
}


def build_tokenizer(world: w.WorldConfig = w.WorldConfig()) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + w.vocabulary(world))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left", model_max_length=256,
        chat_template=CHAT_TEMPLATE,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_processor(world: w.WorldConfig = w.WorldConfig()) -> LlavaProcessor:
    s = world.image_size
    ip = CLIPImageProcessorPil(do_resize=True, size={"height": s, "width": s}, do_center_crop=False,
                               do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    return LlavaProcessor(image_processor=ip, tokenizer=build_tokenizer(world), patch_size=world.patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_model(spec: Spec, world: w.WorldConfig = w.WorldConfig(), seed: int = 0) -> LlavaForConditionalGeneration:
    tok = build_tokenizer(world)
    vision = CLIPVisionConfig(hidden_size=spec.vision_width, intermediate_size=4 * spec.vision_width,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                              image_size=world.image_size, patch_size=world.patch, projection_dim=spec.vision_width)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.heads, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      image_seq_length=world.patches ** 2, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    return model


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

    def sequence(self, qas) -> tuple[list[int], list[int]]:
        ids = [self.tok.bos_token_id] + [self.vocab[IMAGE_TOKEN]] * self.n_image
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

    def cell_batch(self, step: int, n: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images and, per position cell, the attributes of the object there (-100: the cell is empty)."""
        g = self.world.grid
        scenes = [w.sample_scene(self.world, 10_000_000 + step * n + j, "train", self.cfg.seed) for j in range(n)]
        y = {k: torch.full((n, g * g), -100) for k in CELL_TARGETS}
        y["occupied"] = torch.zeros(n, g * g)
        for i, s in enumerate(scenes):
            for o in s.objects:
                c = o.row * g + o.col
                y["occupied"][i, c] = 1
                for k, values in cell_targets(self.world).items():
                    y[k][i, c] = values.index(getattr(o, k))
        return pixel_tensor([s.render() for s in scenes]), y


CELL_TARGETS = ("color", "shape", "size", "fill")


def cell_targets(world: w.WorldConfig) -> dict[str, list[str]]:
    return {"color": list(world.colors), "shape": list(world.shapes), "size": list(w.SIZES), "fill": list(w.FILLS)}


def collate(images, seqs, pad: int) -> dict[str, torch.Tensor]:
    L = max(len(s[0]) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad)
    labels = torch.full((len(seqs), L), -100)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": pixel_tensor(images)}


def image_token_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                         vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


class CellHeads(torch.nn.Module):
    """Per position cell: the mean of its image tokens -> the attributes of the object there."""

    def __init__(self, width: int, world: w.WorldConfig):
        super().__init__()
        n, g = world.patches, world.grid
        cell_of = torch.tensor([(r * world.patch // world.cell) * g + (c * world.patch // world.cell)
                                for r in range(n) for c in range(n)])
        self.register_buffer("pool", torch.stack([(cell_of == k).float() / (cell_of == k).sum() for k in range(g * g)]))
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in cell_targets(world).items()})
        self.occupied = torch.nn.Linear(width, 1)

    def forward(self, tokens: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cells = torch.einsum("ct,btd->bcd", self.pool, tokens)
        loss = F.binary_cross_entropy_with_logits(self.occupied(cells).squeeze(-1), y["occupied"])
        acc = {}
        for k, head in self.heads.items():
            logits = head(cells)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), y[k].flatten(), ignore_index=-100)
            m = y[k] >= 0
            acc[k] = float((logits.argmax(-1)[m] == y[k][m]).float().mean()) if m.any() else float("nan")
        return loss, acc


def vision_pretrain(model, batcher: Batcher, cfg: TrainConfig, ckpt: Path) -> dict[str, float]:
    """What object is in each position cell, from the mean of the cell's image tokens.

    Shape in v2 spans several 8-px patches and comes in three fills, which image-level presence
    targets on pooled tokens did not teach in 600 steps (shape at chance; docs/organisms.md). The
    targets are per position cell (a 2x2 grid), never per patch: the patch-level concepts (parts,
    edges, sub-cell places, backgrounds) stay for the SAE to find. Resumable from `ckpt`."""
    torch.manual_seed(cfg.seed)
    heads = CellHeads(model.config.text_config.hidden_size, batcher.world)
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=cfg.vision_pretrain_lr)
    both = torch.nn.ModuleDict({"model": model, "heads": heads})
    meta = _load(ckpt, both, opt)
    start = meta["step"] if meta else 0
    acc: dict[str, float] = {}
    bar = tqdm(range(start, cfg.vision_pretrain_steps), initial=start, total=cfg.vision_pretrain_steps,
               desc="vision pretrain", mininterval=10)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.vision_pretrain_lr * min(1.0, (step + 1) / 100)
        x, y = batcher.cell_batch(step)
        loss, acc = heads(image_token_features(model, x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(both.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", shape=f"{acc['shape']:.2f}")
        if (step + 1) % 100 == 0 or step + 1 == cfg.vision_pretrain_steps:
            tqdm.write(json.dumps({"vision_pretrain_step": step + 1, "loss": round(loss.item(), 4),
                                   **{k: round(v, 3) for k, v in acc.items()}}))
            _save(ckpt, both, opt, {"step": step + 1})
    return acc


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n]
    rest = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    return torch.optim.AdamW([{"params": rest, "lr": cfg.lr}, {"params": vision, "lr": cfg.lr * cfg.vision_lr_scale}],
                             weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


# ------------------------------------------------------------ checkpoints (safetensors + JSON)

def _save(path: Path, model, opt, meta: dict) -> None:
    """Atomic: write a temp dir, fsync, then rename over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"meta": meta, "groups": sd["param_groups"], "scalars": scalars}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old) if not old.exists() else (_rm(old), os.replace(path, old))
    os.replace(tmp, path)
    _rm(old)


def _rm(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def _load(path: Path, model, opt) -> dict | None:
    for p in (path, path.with_name(path.name + ".old")):
        if (p / "state.json").exists():
            st = json.loads((p / "state.json").read_text())
            model.load_state_dict(load_file(p / "model.safetensors"))
            state: dict = {}
            for key, v in list(load_file(p / "optimizer.safetensors").items()) + list(st["scalars"].items()):
                i, k = key.split(".", 1)
                state.setdefault(int(i), {})[k] = v
            opt.load_state_dict({"state": state, "param_groups": st["groups"]})
            return st["meta"]
    return None


def train(cfg: TrainConfig, out: str | Path, world: w.WorldConfig = w.WorldConfig()) -> Path:
    """Train into `out` (checkpoint under out/checkpoint); re-running resumes where it stopped."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(SPECS[cfg.which], world, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=cfg.position_init_std)
    processor = build_processor(world)
    batcher = Batcher(cfg, world)
    opt = make_optimizer(model, cfg)
    run = json.loads(json.dumps({"train_config": asdict(cfg), "world": world.to_json(),
                                 "spec": asdict(SPECS[cfg.which])}))
    meta = _load(out / "checkpoint", model, opt)
    if meta is not None:
        if meta["run"] != run:
            raise ValueError(f"{out / 'checkpoint'} was made with other settings; use another --out or delete it")
        start = meta["step"]
        print(f"resuming from step {start}", flush=True)
    else:
        acc = vision_pretrain(model, batcher, cfg, out / "vision_checkpoint")
        print(f"vision pretraining done: cell accuracy {acc}", flush=True)
        start = 0
        _save(out / "checkpoint", model, opt, {"step": 0, "run": run})
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        kept = [x for x in log_path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= start]
        log_path.write_text("".join(x + "\n" for x in kept))
    log = open(log_path, "a")
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.which}", mininterval=10)
    for step in bar:
        for g, base in zip(opt.param_groups, (cfg.lr, cfg.lr * cfg.vision_lr_scale)):
            g["lr"] = base * lr_at(step, cfg)
        loss = model(**batcher.batch(step)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        rec = {"step": step + 1, "loss": round(loss.item(), 5), "elapsed": round(time.time() - t0, 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            rec["eval"] = evaluate(model, processor, SPECS[cfg.which].tasks, n=cfg.eval_n, split="val",
                                   seed=cfg.seed, world=world)
            model.train()
            tqdm.write(json.dumps(rec))
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save(out / "checkpoint", model, opt, {"step": step + 1, "run": run})
    model.eval()
    final = out / "model"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "training.json").write_text(json.dumps(run, indent=1))
    return final


# ------------------------------------------------------------ evaluation

def world_items(task: str, n: int, split: str = "test", seed: int = 0, world: w.WorldConfig = w.WorldConfig()):
    """`n` (scene, QA) pairs of one task from a split; scenes that cannot pose it are skipped."""
    rng = np.random.default_rng([seed, 2, sum(map(ord, task))])
    out, i = [], 0
    while len(out) < n:
        scene = w.sample_scene(world, i, split, seed)
        i += 1
        qas = w.scene_questions(scene, rng, (task,))
        if qas:
            out.append((scene, qas[0]))
    return out


def prompt(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


@torch.no_grad()
def answer(model, processor, images, questions: list[str], max_new_tokens: int = 40, batch_size: int = 64) -> list[str]:
    """Greedy answers, batched with left padding."""
    out_text = []
    for s in range(0, len(questions), batch_size):
        texts = [prompt(processor, q) for q in questions[s: s + batch_size]]
        inputs = processor(images=images[s: s + batch_size], text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out_text += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in out_text]


def evaluate(model, processor, tasks, n: int = 200, split: str = "test", seed: int = 0,
             world: w.WorldConfig = w.WorldConfig()) -> dict[str, float]:
    """Exact-match accuracy per task on `n` held-out questions each."""
    model.eval()
    result = {}
    for task in tasks:
        pairs = world_items(task, n, split, seed, world)
        images = [s.render(highlight=qa.highlight) for s, qa in pairs]
        preds = answer(model, processor, images, [qa.question for _, qa in pairs],
                       max_new_tokens=40 if task == "caption" else 12)
        result[task] = round(float(np.mean([p == qa.answer for p, (_, qa) in zip(preds, pairs)])), 4)
    return result


def decoder_layers(model):
    return model.model.language_model.layers


@torch.no_grad()
def image_token_reach(model, processor, layer: int, n: int = 200, split: str = "test", seed: int = 0,
                      world: w.WorldConfig = w.WorldConfig(), tasks: tuple[str, ...] = ("color", "shape", "size",
                                                                                         "fill", "at", "count")) -> float:
    """How much the answers still depend on the image tokens at `layer`: the share of answers that
    change when every image token's output of that layer is replaced by another image's.

    Only questions whose true answer differs between the two images count, so an unchanged answer
    means the model no longer reads the image there."""
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_task = max(1, n // len(tasks))
    items = []
    for task in tasks:
        pairs = world_items(task, per_task * 3, split, seed, world)
        for (a, qa), (b, _) in zip(pairs, pairs[1:] + pairs[:1]):
            truth_b = [x.answer for x in w.scene_questions(b, np.random.default_rng(0), (task,))
                       if x.question == qa.question]
            if truth_b and truth_b[0] != qa.answer:  # the donor image would answer differently
                items.append((a, b, qa))
            if sum(1 for it in items if it[2].task == task) == per_task:
                break
    donor: dict[str, torch.Tensor] = {}
    mode = {"capture": False, "swap": None}

    def hook(_module, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] == 1 or mode["swap"] is None and not mode["capture"]:
            return None
        ids = mode["ids"]
        if mode["capture"]:
            donor["rows"] = h[ids == image_id].clone()
            return None
        h = h.clone()
        h[ids == image_id] = mode["swap"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    changed = []
    try:
        for s in range(0, len(items), 64):
            chunk = items[s: s + 64]
            qs = [it[2].question for it in chunk]
            base = answer(model, processor, [it[0].render() for it in chunk], qs, max_new_tokens=12)
            texts = [prompt(processor, q) for q in qs]
            inb = processor(images=[it[1].render() for it in chunk], text=texts, return_tensors="pt", padding=True)
            mode.update(capture=True, ids=inb["input_ids"])
            model(**inb)
            mode.update(capture=False)
            ina = processor(images=[it[0].render() for it in chunk], text=texts, return_tensors="pt", padding=True)
            mode.update(swap=donor["rows"], ids=ina["input_ids"])
            out = model.generate(**ina, max_new_tokens=12, do_sample=False)
            mode.update(swap=None)
            swapped = [t.strip() for t in processor.batch_decode(out[:, ina["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)]
            changed += [x != y for x, y in zip(base, swapped)]
    finally:
        handle.remove()
    return round(float(np.mean(changed)), 4) if changed else float("nan")


if __name__ == "__main__":  # a background training job: python -m interp.shapes.organisms_v2 subject OUT
    import sys

    torch.set_num_threads(1)
    which, out = sys.argv[1], sys.argv[2]
    recipe = RECIPES[which]
    if len(sys.argv) > 3:
        from dataclasses import replace

        recipe = replace(recipe, steps=int(sys.argv[3]))
    print(train(recipe, out))
