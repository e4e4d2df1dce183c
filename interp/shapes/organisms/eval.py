"""Held-out accuracy of an organism per world task, through the public HF interface
(processor + generate), exactly as a user of the saved model would query it; and how far into
the LLM the answers still read the image tokens (image_token_reach)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from interp.shapes import world as w
from interp.shapes.organisms.build import IMAGE_TOKEN

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
    n_layers = len(decoder_layers(model))
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is not an LLM layer of this model; it has layers 0 to {n_layers - 1}")
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


SELECTS_BY = {"shape": "color", "color": "shape"}  # the attribute a selection question names its object by


def selection_items(task: str, n: int, split: str = "test", seed: int = 0, world: w.WorldConfig = w.WorldConfig()):
    """`n` (scene, QA, right, other) of `task` ("shape": asked by colour, "color": asked by shape) on scenes
    of two objects differing in colour and in shape: the asked object's answer and the other object's."""
    two = replace(world, min_objects=2, max_objects=2)
    by = SELECTS_BY[task]
    rng = np.random.default_rng([seed, 7, sum(map(ord, task))])
    items, i = [], 0
    while len(items) < n:
        scene = w.sample_scene(two, i, split, seed)
        i += 1
        a, b = scene.objects
        if a.color == b.color or a.shape == b.shape:
            continue
        (qa,) = w.scene_questions(scene, rng, (task,))
        asked, other = (a, b) if f" {getattr(a, by)} " in f" {qa.question} " else (b, a)
        items.append((scene, qa, getattr(asked, task), getattr(other, task)))
    return items


@torch.no_grad()
def selection(model, processor, n: int = 200, split: str = "test", seed: int = 0,
              world: w.WorldConfig = w.WorldConfig()) -> dict[str, float]:
    """Does the model find the object a question names? On scenes of two objects that differ in colour and
    in shape, the share of answers naming the asked object's attribute (`right`) and the other object's
    (`other`): "what shape is the X object ?" selects by colour, "what color is the S ?" by shape.
    right ~ other is the failure docs/organisms.md measured: an attribute of some object, not of the named one."""
    out = {}
    for task, by in SELECTS_BY.items():
        items = selection_items(task, n, split, seed, world)
        preds = answer(model, processor, [s.render() for s, *_ in items], [qa.question for _, qa, *_ in items],
                       max_new_tokens=6)
        out[f"select_by_{by}_right"] = round(float(np.mean([p == r for p, (*_, r, _) in zip(preds, items)])), 4)
        out[f"select_by_{by}_other"] = round(float(np.mean([p == o for p, (*_, o) in zip(preds, items)])), 4)
    return out
