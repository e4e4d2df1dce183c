"""Build the shapes-world model organisms from Hugging Face classes.

They are plain `LlavaForConditionalGeneration` models (CLIP vision tower, Llama text
model) with a word-level tokenizer and a CLIP image processor, saved with
`save_pretrained` so the Auto classes load them exactly like hub models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

from interp.shapes.world import WorldConfig, vocabulary

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_TOKEN = "<image>"
# Image first, then the question: image-token activations never depend on the text,
# so one cached pass over an image serves every question about it.
# No BOS here: the tokenizer's post-processor adds it, as hub LLaVA tokenizers do.
CHAT_TEMPLATE = (
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
    tasks: tuple[str, ...]  # world tasks it is trained on

    def to_json(self) -> dict:
        return asdict(self)


SPECS = {
    "subject": OrganismSpec("shapes-subject", 128, 3, 128, 4, 4,
                            ("caption", "color", "shape", "where", "count", "exists", "region")),
    "explainer": OrganismSpec("shapes-explainer", 160, 3, 160, 6, 5,
                              ("caption", "color", "shape", "where", "count", "exists", "region")),
}


def build_tokenizer(world: WorldConfig = WorldConfig()) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + vocabulary(world))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
        model_max_length=128, chat_template=CHAT_TEMPLATE,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_processor(world: WorldConfig = WorldConfig()) -> LlavaProcessor:
    s = world.image_size
    image_processor = CLIPImageProcessorPil(
        do_resize=True, size={"height": s, "width": s}, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(world), patch_size=world.cell,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: OrganismSpec, world: WorldConfig = WorldConfig(), seed: int = 0) -> LlavaForConditionalGeneration:
    import torch

    tok = build_tokenizer(world)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_width, intermediate_size=4 * spec.vision_width,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
        image_size=world.image_size, patch_size=world.cell, projection_dim=spec.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=world.grid * world.grid, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model
