"""Tiny random models of every supported family, built from configs and saved like hub checkpoints.

Nothing can be downloaded in tests, so each family gets a config small enough to build in
well under a second, a processor and tokenizer made here (a byte-level BPE trained on a few
lines, with the family's image tokens as special tokens), and `save_pretrained` into a
session tmp dir: `load_model(path)` then goes through exactly the Auto-class path a hub
checkpoint takes. The builders are cached per session, so importing these fixtures into
several test modules still builds each model once.

Processors that have a video slot are built through `without_video`: their video processors
need torchvision, which must never be installed here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from interp.model.models import without_video

# the families every multimodal test runs on; smolvlm is only on demand (its processor needs num2words,
# and its apply_chat_template needs a video processor, hence torchvision)
MULTIMODAL = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3")
WIDTH = 32  # every text model: 32 wide, 2 layers, 2 heads of 16
CORPUS = [
    "what color is the circle ? the circle is red .",
    "describe the image . a blue square and a green triangle .",
    "USER: ASSISTANT: user assistant system model",
    "how many objects are there ? three . where is the cross ? top left .",
    "hello world , this is a tiny tokenizer for tests .\n\n",
]
# user turn, then the image(s) and text items in order, then the assistant prompt
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for item in m['content'] %}"
    "{% if item['type'] == 'image' %}IMAGE {% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_BUILT: dict[str, Path] = {}


def tiny_tokenizer(image_tokens: list[str], image_text: str | None = None, **special) -> PreTrainedTokenizerFast:
    """Byte-level BPE over CORPUS; `image_tokens` become special tokens. `image_text` is what the
    chat template writes for an image item (defaults to the first image token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=base + image_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    template = CHAT_TEMPLATE.replace("IMAGE", image_text or "".join(image_tokens[:1]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=template, padding_side="left", **special)
    fast.add_special_tokens({"additional_special_tokens": image_tokens})
    return fast


def _text_kwargs(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _vision_kwargs(image_size: int, patch_size: int) -> dict:
    return dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1, num_attention_heads=2,
                image_size=image_size, patch_size=patch_size)


def build_llava():
    """LLaVA 1.5 as the shapes organisms are: CLIP vision (64 px, 8 px patches: 8x8 tokens), Llama text."""
    from interp.shapes.organisms.build import OrganismSpec, build_model, build_processor

    spec = OrganismSpec("tiny-llava", WIDTH, 1, WIDTH, 2, 2, ())
    return build_model(spec), build_processor()


def build_llava_next():
    """LLaVA-NeXT: 32 px tiles of 8 px patches (4x4 tokens a tile), up to 2x2 tiles."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    tok = tiny_tokenizer(["<image>"])
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**_vision_kwargs(32, 8)),
                          text_config=LlamaConfig(**_text_kwargs(tok)),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_select_strategy="default", vision_feature_layer=-1)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tok.chat_template)
    return LlavaNextForConditionalGeneration(cfg), processor


def build_llava_onevision():
    """LLaVA-OneVision: SigLIP vision, 32 px tiles of 8 px patches, up to 4x4 tiles, so large images
    go through the `anyres_max_9` bilinear pooling."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2Config, SiglipVisionConfig)

    tok = tiny_tokenizer(["<image>", "<video>"])
    pinpoints = [[32 * i, 32 * j] for i in range(1, 5) for j in range(1, 5)]
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs(32, 8)), text_config=Qwen2Config(**_text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9")
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = without_video(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template)
    return LlavaOnevisionForConditionalGeneration(cfg), processor


def _build_qwen(version: str):
    import transformers as tf

    prefix = "Qwen2VL" if version == "2" else "Qwen2_5_VL"
    tok = tiny_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"],
                         image_text="<|vision_start|><|image_pad|><|vision_end|>")
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("image_token_id", "<|image_pad|>"),
                                                         ("video_token_id", "<|video_pad|>"),
                                                         ("vision_start_token_id", "<|vision_start|>"),
                                                         ("vision_end_token_id", "<|vision_end|>"))}
    text = {**_text_kwargs(tok), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3]}}  # sums to head_dim / 2
    vision = dict(depth=1, hidden_size=WIDTH, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision.update(embed_dim=WIDTH, mlp_ratio=2)
    else:
        vision.update(intermediate_size=2 * WIDTH, out_hidden_size=WIDTH, window_size=32, fullatt_block_indexes=[0])
    cfg = getattr(tf, f"{prefix}Config")(text_config=text, vision_config=vision, **ids)
    image_processor = tf.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                                  size={"shortest_edge": 16 * 16, "longest_edge": 16 * 16 * 64})
    processor = without_video(getattr(tf, f"{prefix}Processor"))(image_processor=image_processor, tokenizer=tok,
                                                                  chat_template=tok.chat_template)
    return getattr(tf, f"{prefix}ForConditionalGeneration")(cfg), processor


def build_qwen2_vl():
    """Qwen2-VL: 8 px patches merged 2x2 into one token (16 px), images resized to multiples of 16."""
    return _build_qwen("2")


def build_qwen2_5_vl():
    """Qwen2.5-VL: as Qwen2-VL, with window attention in the vision tower."""
    return _build_qwen("2.5")


def _build_idefics3(prefix: str):
    import transformers as tf

    row_col = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = tiny_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *row_col])
    cfg = getattr(tf, f"{prefix}Config")(
        vision_config=getattr(tf, f"{prefix}VisionConfig")(**_vision_kwargs(32, 8)),
        text_config=tf.LlamaConfig(**_text_kwargs(tok)), image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2)
    image_processor = getattr(tf, f"{prefix}ImageProcessorPil")(size={"longest_edge": 64},
                                                                 max_image_size={"longest_edge": 32})
    cls = getattr(tf, f"{prefix}Processor")
    video = {"video_processor": None} if "video_processor" in cls.get_attributes() else {}  # SmolVLM requires it
    processor = without_video(cls)(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                   chat_template=tok.chat_template, **video)
    return getattr(tf, f"{prefix}ForConditionalGeneration")(cfg), processor


def build_idefics3():
    """Idefics3: 32 px tiles (8 px patches, pixel shuffle 2: 2x2 tokens a tile), images resized to a
    64 px longest edge, so up to 2x2 tiles plus the global image."""
    return _build_idefics3("Idefics3")


def build_smolvlm():
    """SmolVLM(2): Idefics3's geometry under its own classes (its processor needs num2words)."""
    pytest.importorskip("num2words")
    return _build_idefics3("SmolVLM")


def build_gemma3():
    """Gemma3: SigLIP vision (32 px, 8 px patches: 4x4), average-pooled to 2x2 = mm_tokens_per_image."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = tiny_tokenizer(list(special.values()), image_text="<start_of_image>", extra_special_tokens=special)
    text = Gemma3TextConfig(**_text_kwargs(tok), head_dim=16, sliding_window=64)
    cfg = Gemma3Config(text_config=text, vision_config=SiglipVisionConfig(**_vision_kwargs(32, 8)),
                       mm_tokens_per_image=4, boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                       eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                       image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=tok.chat_template)
    return Gemma3ForConditionalGeneration(cfg), processor


def build_llama():
    """A causal text LM (Llama) with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer([])
    return LlamaForCausalLM(LlamaConfig(**_text_kwargs(tok))), tok


BUILDERS = {
    "llava": build_llava, "llava_next": build_llava_next, "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl, "idefics3": build_idefics3, "smolvlm": build_smolvlm,
    "gemma3": build_gemma3, "llama": build_llama,
}


def tiny_model_path(family: str, root: Path) -> Path:
    """Build, save and return the directory of the tiny `family` model (once per session)."""
    if family not in _BUILT:
        torch.manual_seed(0)
        model, processor = BUILDERS[family]()
        path = root / family
        model.save_pretrained(path)
        processor.save_pretrained(path)
        _BUILT[family] = path
    return _BUILT[family]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session", params=MULTIMODAL)
def multimodal_path(request, tiny_root) -> tuple[str, Path]:
    """(family, path) for each multimodal family in turn."""
    return request.param, tiny_model_path(request.param, tiny_root)


@pytest.fixture(scope="session")
def tiny_path(tiny_root):
    """`tiny_path("qwen2_vl")`: the saved tiny model of one family."""
    return lambda family: tiny_model_path(family, tiny_root)


@pytest.fixture(scope="session")
def hooked_transformer(tiny_root):
    """(HookedTransformer built from a config, its tokenizer): TransformerLens without a download.

    The tokenizer is saved and reloaded first: TransformerLens re-opens it by `name_or_path`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tiny_tokenizer([]).save_pretrained(tiny_root / "tl_tokenizer")
    tok = AutoTokenizer.from_pretrained(tiny_root / "tl_tokenizer")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=WIDTH, n_ctx=64, d_head=16, n_heads=2, d_vocab=len(tok),
                                  act_fn="gelu", normalization_type="LN")
    return HookedTransformer(cfg, tokenizer=tok), tok
