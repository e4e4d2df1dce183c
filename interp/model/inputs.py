"""Model inputs for samples: the prompt template rendered through the model's chat template
and processor. The cache, the SAE evaluation and steering build their inputs here, so a
sample gets the same tokens in every stage.

A sample is anything with `.image` (a PIL image or None) and `.text` (the dataset's own text,
which a template's {text} slot takes), such as `interp.cache.data.Sample`.
"""

from __future__ import annotations

import torch

DEFAULT_TEMPLATE = "{image} describe the image ."
QA_TEMPLATE = "{image} {text}"
"""The template of a data source whose samples carry their own question (shapes:SPLIT:qa)."""


class PromptError(ValueError):
    """A prompt template that does not fit the model or cannot be filled in."""



def check_template(template: str, multimodal: bool) -> None:
    if multimodal and "{image}" not in template:
        raise PromptError(f"prompt template {template!r} has no image slot: put {{image}} where the image goes, "
                        f"e.g. {DEFAULT_TEMPLATE!r}")
    if not multimodal and "{image}" in template:
        raise PromptError(f"prompt template {template!r} has an image slot but the model reads text only")
    try:
        template.format(image="", text="")
    except (KeyError, IndexError, ValueError) as e:
        raise PromptError(f"prompt template {template!r} is malformed ({e}); its slots are {{image}} and {{text}}") from None


def user_text(template: str, sample) -> str:
    """The template's text with the dataset text filled in and the image slot removed."""
    return " ".join(template.replace("{image}", " ").format(text=sample.text).split())


def chat_messages(template: str, sample) -> list[dict]:
    """One user turn, the image placed where the template puts it."""
    before, _, after = template.partition("{image}")
    content = []
    for piece, is_image in ((before, False), (None, True), (after, False)):
        if is_image:
            content.append({"type": "image"})
        elif piece and piece.strip():
            content.append({"type": "text", "text": " ".join(piece.format(text=sample.text).split())})
    return [{"role": "user", "content": content}]




def prompts(lm, samples: list, template: str, answers: list[str] | None = None) -> tuple[list[str], list[str]]:
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


def model_inputs(lm, samples: list, texts: list[str]) -> dict:
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
