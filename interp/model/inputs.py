"""Model inputs for samples: the prompt template rendered through the model's chat template
and processor. The cache, the SAE evaluation and steering build their inputs here, so a
sample gets the same tokens in every stage."""

from __future__ import annotations

import torch

from interp.cache.data import Sample, chat_messages, user_text


def prompts(lm, samples: list[Sample], template: str, answers: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(full model input strings, the user's own text inside them). `answers` are appended as the
    assistant's reply (for losses on answers)."""
    tok = lm.processor or lm.tokenizer
    texts, users = [], []
    for i, s in enumerate(samples):
        users.append(user_text(template, s))
        if getattr(tok, "chat_template", None) and lm.is_multimodal:
            text = tok.apply_chat_template(chat_messages(template, s), add_generation_prompt=True)
        else:
            text = users[-1]
        if answers is not None:
            text = f"{text}{answers[i]}{lm.tokenizer.eos_token or ''}"
        texts.append(text)
    return texts, users


def model_inputs(lm, samples: list[Sample], texts: list[str]) -> dict:
    """Tokenised, padded inputs on the model's device; floating tensors in the model's dtype."""
    if lm.is_multimodal:
        enc = lm.processor(images=[[s.image] for s in samples], text=texts, return_tensors="pt", padding=True)
    else:
        enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    out = {}
    for k, v in enc.items():
        if torch.is_tensor(v):
            v = v.to(lm.device)
            out[k] = v.to(lm.dtype) if v.is_floating_point() else v
        else:
            out[k] = v
    if lm.kind == "hooked-transformer":
        out = {"input": out["input_ids"]}
    return out
