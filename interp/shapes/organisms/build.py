"""The shapes-world organisms' architecture: a word-level tokenizer, a LLaVA processor and model.

Both organisms are plain `LlavaForConditionalGeneration` models (CLIP vision tower, Llama text
model), saved with `save_pretrained` so the Auto classes load them like hub models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from interp.shapes import world as w

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
class OrganismSpec:
    name: str
    vision_width: int
    vision_layers: int
    text_width: int
    text_layers: int
    heads: int
    tasks: tuple[str, ...]

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        """What `interp organism eval` measures: the trained tasks and, for a region describer, "patch"
        (one highlighted patch: the regions the explain stage asks it about)."""
        return self.tasks + (("patch",) if "region" in self.tasks else ())


SPECS = {
    "subject": OrganismSpec("shapes-subject-v2", 128, 4, 128, 8, 4, w.SUBJECT_TASKS),
    "explainer": OrganismSpec("shapes-explainer-v2", 160, 4, 160, 8, 5, w.EXPLAINER_TASKS),
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


def build_model(spec: OrganismSpec, world: w.WorldConfig = w.WorldConfig(), seed: int = 0) -> LlavaForConditionalGeneration:
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
