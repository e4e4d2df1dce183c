"""Layer addressing: the decoder of every family, canonical names, sites, and hooks on the resolved modules."""

import pytest
import torch
from PIL import Image


from tiny_models import WIDTH

from interp.model.layers import HookPoint, UnknownLayerError, decoder_layers, list_layers, resolve_layer
from interp.model.models import load_model, wrap_model

DECODER = {"idefics3": "model.text_model.layers", "llama": "model.layers"}  # the others: model.language_model.layers


def test_decoder_layers_per_family(multimodal_path, tiny_path):
    family, path = multimodal_path
    for name, lm in ((family, load_model(str(path))), ("llama", load_model(str(tiny_path("llama"))))):
        layers = decoder_layers(lm)
        prefix = DECODER.get(name, "model.language_model.layers")
        assert [p for p, _ in layers] == [f"{prefix}.0", f"{prefix}.1"]
        assert all(lm.model.get_submodule(p) is m for p, m in layers)


def test_decoder_is_the_outermost_list(tiny_path):
    lm = load_model(str(tiny_path("llama")))
    lm.model.model.layers[0].mlp.experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(5))  # nested
    lm.model.model.vision_tower = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(9))  # longer, not language
    assert [p for p, _ in decoder_layers(lm)] == ["model.layers.0", "model.layers.1"]


def test_list_and_resolve(multimodal_path):
    family, path = multimodal_path
    lm = load_model(str(path))
    prefix = DECODER.get(family, "model.language_model.layers")
    assert list_layers(lm) == ["layers.0", "layers.0.attn", "layers.0.mlp", "layers.1", "layers.1.attn", "layers.1.mlp"]
    assert resolve_layer(lm, -1) == HookPoint("layers.1", f"{prefix}.1", 1, "resid")
    assert resolve_layer(lm, 0, "attn") == HookPoint("layers.0.attn", f"{prefix}.0.self_attn", 0, "attn")
    assert resolve_layer(lm, "layers.1.mlp") == HookPoint("layers.1.mlp", f"{prefix}.1.mlp", 1, "mlp")
    assert resolve_layer(lm, f"{prefix}.0.self_attn").name == "layers.0.attn"
    assert resolve_layer(lm, f"{prefix}.1").name == "layers.1"
    assert resolve_layer(lm, "layers.0", site="mlp").name == "layers.0.mlp"
    assert resolve_layer(lm, "-2").name == "layers.0"


def test_unknown_layer_lists_valid_names(tiny_path, hooked_transformer):
    lm = load_model(str(tiny_path("llava")))
    for bad in (2, -3, "layers.2", "model.vision_tower.encoder.layers.0", "blocks.0"):
        with pytest.raises(UnknownLayerError, match=r"layers\.0, layers\.1, each with \.attn and \.mlp") as info:
            resolve_layer(lm, bad)
        assert isinstance(info.value, ValueError) and "-2 to 1" in str(info.value)
    with pytest.raises(UnknownLayerError, match="valid sites: resid, attn, mlp"):
        resolve_layer(lm, 0, site="embed")

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    _, tok = hooked_transformer
    deep = HookedTransformer(HookedTransformerConfig(n_layers=12, d_model=8, n_ctx=8, d_head=4, n_heads=2,
                                                     d_vocab=len(tok), act_fn="relu"), tokenizer=tok)
    with pytest.raises(UnknownLayerError, match=r"valid: layers\.0 … layers\.11, each with \.attn and \.mlp"):
        resolve_layer(wrap_model(deep, tok), "layers.12")


def _output(captured):
    return captured[0] if isinstance(captured, tuple) else captured


def test_forward_hook_at_resolved_module(multimodal_path):
    family, path = multimodal_path
    lm = load_model(str(path))
    proc = lm.processor
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                       "text": "what color is it ?"}]}])
    inputs = proc(images=[[image]], text=[text], return_tensors="pt")
    captured = {}
    points = [resolve_layer(lm, i, site) for i in (0, -1) for site in ("resid", "attn", "mlp")]
    handles = [lm.model.get_submodule(p.module_path).register_forward_hook(
        lambda module, args, out, name=p.name: captured.__setitem__(name, _output(out))) for p in points]
    try:
        with torch.no_grad():
            lm.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert sorted(captured) == sorted(p.name for p in points)
    for name, out in captured.items():
        assert tuple(out.shape) == (1, inputs["input_ids"].shape[1], WIDTH), name


def test_hooked_transformer_layers(hooked_transformer):
    model, tok = hooked_transformer
    lm = wrap_model(model, tok)
    assert [p for p, _ in decoder_layers(lm)] == ["blocks.0", "blocks.1"]
    assert resolve_layer(lm, -1) == HookPoint("layers.1", "blocks.1.hook_resid_post", 1, "resid")
    assert resolve_layer(lm, "blocks.0.hook_attn_out").name == "layers.0.attn"
    point = resolve_layer(lm, 0, "mlp")
    captured = []
    handle = model.get_submodule(point.module_path).register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.no_grad():
            model(tok(["what color is the circle ?"], return_tensors="pt").input_ids)
    finally:
        handle.remove()
    assert captured[0].shape[0] == 1 and captured[0].shape[-1] == WIDTH
