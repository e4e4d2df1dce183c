"""Held-out accuracy of an organism per world task, through the public HF interface
(processor + generate), exactly as a user of the saved model would query it."""

from __future__ import annotations

import numpy as np
import torch

from interp.shapes.world import WorldConfig, sample_scene, scene_questions


def world_items(task: str, n: int, split: str = "test", seed: int = 0, world: WorldConfig = WorldConfig()):
    """`n` (scene, QA) pairs of one task from a split; scenes that cannot pose it are skipped."""
    rng = np.random.default_rng([seed, 2, sum(map(ord, task))])
    out, i = [], 0
    while len(out) < n:
        scene = sample_scene(world, i, split, seed)
        i += 1
        qas = scene_questions(scene, rng, (task,))
        if qas:
            out.append((scene, qas[0]))
    return out


def world_questions(task: str, n: int, split: str = "test", seed: int = 0, world: WorldConfig = WorldConfig()):
    """`n` (image, QA) pairs of one task from a split; scenes that cannot pose it are skipped."""
    return [(scene.render(highlight=qa.highlight), qa) for scene, qa in world_items(task, n, split, seed, world)]


def prompt(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


@torch.no_grad()
def answer(model, processor, images, questions: list[str], max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    """Greedy answers, batched with left padding."""
    answers = []
    for s in range(0, len(questions), batch_size):
        texts = [prompt(processor, q) for q in questions[s: s + batch_size]]
        inputs = processor(images=images[s: s + batch_size], text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate(model, processor, tasks, n: int = 200, split: str = "test", seed: int = 0,
             world: WorldConfig = WorldConfig()) -> dict[str, float]:
    """Exact-match accuracy per task on `n` held-out questions each."""
    was_training = model.training
    model.eval()
    result = {}
    for task in tasks:
        pairs = world_questions(task, n, split, seed, world)
        preds = answer(model, processor, [p[0] for p in pairs], [p[1].question for p in pairs])
        result[task] = round(float(np.mean([p == qa.answer for p, (_, qa) in zip(preds, pairs)])), 4)
    model.train(was_training)
    return result
