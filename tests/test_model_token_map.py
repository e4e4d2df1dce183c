"""token_table: roles, image/tile/row/col and pixel boxes for every family, checked three ways:
against the processor's own placeholder counts, against hand-computed geometry, and end to end
(each patch token's features, made to be the mean colour of the pixels the model pooled into it,
must come from the box the table gives)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image


from interp.model.layers import decoder_layers
from interp.model.models import load_model
from interp.cache.format import ROLES, TOKEN_DTYPE, role_code
from interp.model.token_map import TokenLayoutError, image_token_id, token_table

PROMPTS = ["what color is the circle ?", "describe the image ."]


def _process(lm, images, prompts=PROMPTS, padding_side="left"):
    """Chat-template each sample (its images, then its prompt) and run the processor with padding."""
    proc = lm.processor
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(ims)
                                        + [{"type": "text", "text": prompt}]}], add_generation_prompt=True)
             for ims, prompt in zip(images, prompts)]
    proc.tokenizer.padding_side = padding_side
    return proc(images=images, text=texts, return_tensors="pt", padding=True)


def _boxes(rows):
    return np.stack([rows["x0"], rows["y0"], rows["x1"], rows["y1"]], -1)


def _ramp(w, h):
    """Red rises left to right, green top to bottom: a pixel's colour says where it is."""
    x = (np.arange(w) + 0.5) / w * 255
    y = (np.arange(h) + 0.5) / h * 255
    return Image.fromarray(np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.full((h, w), 128.0)), -1)
                           .astype(np.uint8))


def test_counts_match_processor_in_padded_batches(multimodal_path):
    """Different-size images, one and two per sample, left and right padding."""
    _, path = multimodal_path
    lm = load_model(str(path))
    images = [[_ramp(80, 20)], [_ramp(48, 48), _ramp(30, 70)]]
    tables = {}
    for side in ("left", "right"):
        inputs = _process(lm, images, padding_side=side)
        ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
        table = token_table(lm, inputs, images, PROMPTS)
        assert table.dtype == TOKEN_DTYPE and len(table) == ids.size
        table = table.reshape(ids.shape)
        assert (table["sample"] == np.arange(len(ids))[:, None]).all()
        assert (table["position"] == np.arange(ids.shape[1])).all()
        assert (table["token_id"] == ids).all() and ((table["role"] == role_code("pad")) == ~mask).all()
        is_image = np.isin(table["role"], [role_code("image_patch"), role_code("image_special")])
        placeholder = ids == image_token_id(lm)
        assert (is_image | ~placeholder).all(), "every placeholder the processor wrote is an image token"
        for s, sample_images in enumerate(images):
            assert sorted(set(table["image"][s][is_image[s]])) == list(range(len(sample_images)))
            patches = table[s][table["role"][s] == role_code("image_patch")]
            for k, (w, h) in enumerate(im.size for im in sample_images):
                box = _boxes(patches[patches["image"] == k])
                assert len(box) and (box[:, 0] >= 0).all() and (box[:, 2] <= w).all() and (box[:, 3] <= h).all()
                base = box[patches[patches["image"] == k]["tile"] == 0]
                assert np.isclose(((base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])).sum(), w * h, atol=1)
            assert not is_image[s][~mask[s]].any()
        tables[side] = [table[s][mask[s]] for s in range(len(ids))]
    for left, right in zip(tables["left"], tables["right"]):  # same tokens, only shifted
        for field in ("role", "image", "tile", "row", "col", "x0", "y1", "token_id"):
            assert (left[field] == right[field]).all(), field


def _pixel_mean_features(lm):
    """Make each image token's features the mean normalised RGB of the pixels the model pooled into
    it: the vision encoder's output becomes per-patch means (with a zero CLS where CLIP has one) and
    the projectors average or pass through, so only the family's own packing code moves them."""
    inner, width = lm.model.model, lm.model.config.get_text_config().hidden_size

    def pad(means):
        return torch.nn.functional.pad(means, (0, width - means.shape[-1]))

    if lm.family in ("qwen2_vl", "qwen2_5_vl"):
        m = inner.visual.spatial_merge_size

        def qwen_hook(module, args, kwargs, out):
            means = args[0].reshape(len(args[0]), 3, -1).mean(-1)  # patches are flattened (channel, t, p, p)
            out.pooler_output = pad(means.reshape(-1, m * m, 3).mean(1))
        inner.visual.register_forward_hook(qwen_hook, with_kwargs=True)
        return
    tower = getattr(inner, "vision_tower", None) or inner.vision_model
    p = lm.model.config.vision_config.patch_size
    cls = hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding")

    def hook(module, args, kwargs, out):
        pixels = args[0] if args else kwargs["pixel_values"]
        n, c, h, w = pixels.shape
        means = pixels.reshape(n, c, h // p, p, w // p, p).mean((3, 5)).flatten(2).transpose(1, 2)
        features = pad(torch.cat([torch.zeros(n, int(cls), c), means], 1))
        out.last_hidden_state = features
        if out.hidden_states is not None:
            out.hidden_states = (features,) * len(out.hidden_states)
    tower.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        if lm.family == "idefics3":
            proj = inner.connector.modality_projection.proj
            proj.weight.copy_(torch.eye(width).repeat(1, proj.in_features // width) * width / proj.in_features)
        elif lm.family == "gemma3":
            inner.multi_modal_projector.mm_soft_emb_norm = torch.nn.Identity()
            inner.multi_modal_projector.mm_input_projection_weight.copy_(torch.eye(width))
        else:
            inner.multi_modal_projector = torch.nn.Identity()


@pytest.mark.parametrize("sizes", [[(80, 20)], [(128, 100)], [(48, 48), (30, 70)]], ids=["wide", "large", "two"])
def test_patch_features_come_from_their_boxes(multimodal_path, sizes):
    """End to end: decode where each patch token's colour came from; it must be its box's centre."""
    family, path = multimodal_path
    lm = load_model(str(path))
    _pixel_mean_features(lm)
    images = [[_ramp(w, h) for w, h in sizes]]
    inputs = _process(lm, images, PROMPTS[:1])
    seen = {}
    root = lm.model.get_submodule(decoder_layers(lm)[0][0].rsplit(".layers.", 1)[0])
    root.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        lm.model(**inputs)
    table = token_table(lm, inputs, images)
    patches = table[table["role"] == role_code("image_patch")]
    ip = lm.processor.image_processor
    colour = seen["embeds"][0, patches["position"].astype(np.int64), :2].numpy()
    colour = (colour * np.array(ip.image_std[:2]) + np.array(ip.image_mean[:2])) * 255  # back to 0..255
    box = _boxes(patches)
    extent = np.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], -1)
    full = np.ones(len(box), bool)  # cells partly over padding are clipped smaller and their colour is mixed
    for key in set(zip(patches["image"], patches["tile"])):
        group = (patches["image"] == key[0]) & (patches["tile"] == key[1])
        full[group] = (extent[group] >= 0.99 * extent[group].max(0)).all(1)
    assert full.mean() > 0.6
    colour, box, extent, patches = colour[full], box[full], extent[full], patches[full]
    size = np.array([sizes[k] for k in patches["image"]], float)
    centre = np.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2], -1)
    error = np.abs(colour / 255 * size - centre)
    assert (error <= 0.25 * extent + 1.5).all(), (family, error.max(0), patches[np.argmax(error.max(1))])


def test_llava_organism_grid(tiny_path):
    lm = load_model(str(tiny_path("llava")))
    images = [[Image.new("RGB", (64, 64))]]  # world v2: 64 px, 8 x 8 patches of 8 px
    inputs = _process(lm, images, PROMPTS[:1])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)  # as a bf16 model gets them: no numpy dtype
    table = token_table(lm, inputs, images, PROMPTS[:1])
    patches = table[table["role"] == role_code("image_patch")]
    assert len(patches) == 64 and (patches["tile"] == 0).all()
    assert [tuple(b) for b in _boxes(patches[(patches["row"] == 1) & (patches["col"] == 2)])] == [(16, 8, 24, 16)]
    assert (patches["row"] * 8 + patches["col"] == np.arange(64)).all()


def test_llava_center_crop_and_pad_to_square(tiny_path):
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaProcessor

    lm = load_model(str(tiny_path("llava")))
    p = lm.processor

    def with_image_processor(ip):
        return replace(lm, processor=LlavaProcessor(image_processor=ip, tokenizer=p.tokenizer, patch_size=8,
                                                    vision_feature_select_strategy="default",
                                                    num_additional_image_tokens=1, chat_template=p.chat_template))

    crop = with_image_processor(CLIPImageProcessorPil(size={"shortest_edge": 64},
                                                      crop_size={"height": 64, "width": 64}))
    images = [[Image.new("RGB", (256, 128))]]  # resized to 128 x 64, then the centre 64 x 64 is kept
    table = token_table(crop, _process(crop, images, PROMPTS[:1]), images)
    patches = table[table["role"] == role_code("image_patch")]
    assert len(patches) == 64  # 8 px patches of the 64 px crop: 16 px of the original
    assert tuple(_boxes(patches)[0]) == (64, 0, 80, 16) and tuple(_boxes(patches)[-1]) == (176, 112, 192, 128)

    pad = with_image_processor(LlavaImageProcessorPil(do_pad=True, size={"height": 64, "width": 64},
                                                      do_center_crop=False))
    images = [[Image.new("RGB", (128, 80))]]  # padded to 128 x 128 (image rows 24..104), resized to 64 x 64
    table = token_table(pad, _process(pad, images, PROMPTS[:1]), images)
    patches = table[table["role"] == role_code("image_patch")]
    # canvas rows of 16 px from y = -24: the first lies in the top padding, the last in the bottom one, two straddle it
    assert [tuple(b) for b in _boxes(patches[patches["col"] == 0])] == [
        (0, 0, 16, 0), (0, 0, 16, 8), (0, 8, 16, 24), (0, 24, 16, 40), (0, 40, 16, 56), (0, 56, 16, 72),
        (0, 72, 16, 80), (0, 80, 16, 80)]


def test_llava_next_tiles_and_unpadding(tiny_path):
    lm = load_model(str(tiny_path("llava_next")))
    images = [[Image.new("RGB", (80, 20))]]  # best fit 32 x 64: 2 tiles; 8 px of padding above and below
    table = token_table(lm, _process(lm, images, PROMPTS[:1]), images)
    image = table[table["image"] == 0]
    assert list(image["role"]).count(role_code("image_special")) == 2  # one newline per kept row
    patches = image[image["role"] == role_code("image_patch")]
    base, grid = patches[patches["tile"] == 0], patches[patches["tile"] > 0]
    assert len(base) == 16 and tuple(_boxes(base)[0]) == (0, 0, 20, 5)
    assert sorted(set(grid["row"])) == [1, 2]  # the padding rows 0 and 3 are dropped
    assert tuple(_boxes(grid)[0]) == (0, 0, 10, 10) and grid["tile"][0] == 1
    left, right = _boxes(grid[grid["tile"] == 1]), _boxes(grid[grid["tile"] == 2])
    assert (left[:, 2] <= 40).all() and (right[:, 0] >= 40).all() and right[:, 2].max() == 80
    assert image["role"][-1] == role_code("image_special") and image["role"][16 + 8] == role_code("image_special")


def test_onevision_pooling_and_multi_image(tiny_path):
    lm = load_model(str(tiny_path("llava_onevision")))
    images = [[Image.new("RGB", (128, 100))]]  # 4 x 4 tiles: 12 x 16 patches kept, pooled to 10 x 13
    table = token_table(lm, _process(lm, images, PROMPTS[:1]), images)
    grid = table[(table["role"] == role_code("image_patch")) & (table["tile"] > 0)]
    assert len(grid) == 10 * 13 and (table["role"] == role_code("image_special")).sum() == 10
    boxes = _boxes(grid)
    assert np.allclose(boxes[:, 2] - boxes[:, 0], 128 / 13, atol=1e-3) and np.allclose(boxes[:, 3] - boxes[:, 1], 9.6)
    assert boxes[:, 1].min() == 2 and boxes[:, 3].max() == 98  # two padded patch rows dropped at each end
    # tile (i, j) is canvas square (32 i, 32 j); the canvas is the image 14 px down: label = tile under the centre
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2 + 14
    i, j = np.divmod(grid["tile"] - 1, 4)
    assert ((cx // 32 == j) & (cy // 32 == i)).all()
    assert ((grid["row"] == cy % 32 // 8) & (grid["col"] == cx % 32 // 8)).all()

    images = [[Image.new("RGB", (64, 32)), Image.new("RGB", (32, 32))]]  # several images: base view + newline each
    table = token_table(lm, _process(lm, images, PROMPTS[:1]), images)
    for k in (0, 1):
        image = table[table["image"] == k]
        assert list(image["role"]).count(role_code("image_patch")) == 16 and image["role"][-1] == role_code("image_special")
    first = table[(table["image"] == 0) & (table["role"] == role_code("image_patch"))]
    assert tuple(_boxes(first)[0]) == (0, 0, 16, 0) and tuple(_boxes(first)[4]) == (0, 0, 16, 16)  # padded square


def test_qwen_merged_boxes(tiny_path):
    for family in ("qwen2_vl", "qwen2_5_vl"):
        lm = load_model(str(tiny_path(family)))
        images = [[Image.new("RGB", (100, 50))]]  # resized to 96 x 48: 3 x 6 tokens of 16 px
        inputs = _process(lm, images, PROMPTS[:1])
        assert inputs["image_grid_thw"].tolist() == [[1, 6, 12]]
        table = token_table(lm, inputs, images)
        patches = table[table["role"] == role_code("image_patch")]
        assert (patches["row"].max(), patches["col"].max()) == (2, 5)
        expected = [(c * 16 * 100 / 96, r * 16 * 50 / 48, (c + 1) * 16 * 100 / 96, (r + 1) * 16 * 50 / 48)
                    for r in range(3) for c in range(6)]
        assert np.allclose(_boxes(patches), expected)
        markers = table[table["role"] == role_code("image_special")]
        assert lm.tokenizer.convert_ids_to_tokens(markers["token_id"].tolist()) == ["<|vision_start|>",
                                                                                    "<|vision_end|>"]


def test_idefics3_tiles_and_global_view(tiny_path):
    lm = load_model(str(tiny_path("idefics3")))
    images = [[Image.new("RGB", (100, 40))]]  # longest edge 64 -> 64 x 26 -> 64 x 32: 1 x 2 tiles + global
    table = token_table(lm, _process(lm, images, PROMPTS[:1]), images)
    image = table[table["image"] == 0]
    patches = image[image["role"] == role_code("image_patch")]
    assert list(patches["tile"]) == [1] * 4 + [2] * 4 + [0] * 4  # tiles first, the global view last
    assert tuple(_boxes(patches)[0]) == (0, 0, 25, 20) and tuple(_boxes(patches)[-1]) == (50, 20, 100, 40)
    specials = lm.tokenizer.convert_ids_to_tokens(image[image["role"] == role_code("image_special")]["token_id"].tolist())
    assert specials[:2] == ["<fake_token_around_image>", "<row_1_col_1>"] and "<global-img>" in specials
    assert specials[-1] == "<fake_token_around_image>" and "<row_1_col_2>" in specials

    images = [[Image.new("RGB", (48, 48))]]  # 64 x 64: 2 x 2 tiles, row-major
    table = token_table(lm, _process(lm, images, PROMPTS[:1]), images)
    patches = table[table["role"] == role_code("image_patch")]
    assert list(patches["tile"]) == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [0] * 4
    assert tuple(_boxes(patches[patches["tile"] == 3])[0]) == (0, 24, 12, 36)


def test_smolvlm_shares_idefics3_geometry(tiny_path):
    """SmolVLM has its own classes (and needs num2words); its chat template wants a video processor,
    so the prompt is written out here."""
    pytest.importorskip("num2words")
    images = [[_ramp(100, 40), _ramp(48, 48)]]
    text = ["USER: <image><image> what color is the circle ?\nASSISTANT:"]
    smol, idefics = (load_model(str(tiny_path(family))) for family in ("smolvlm", "idefics3"))
    assert smol.family == "smolvlm" and type(smol.processor).__name__ == "SmolVLMProcessor"
    a, b = (token_table(lm, lm.processor(images=images, text=text, return_tensors="pt"), images, PROMPTS[:1])
            for lm in (smol, idefics))
    assert len(a) == len(b) and (a["role"] == role_code("image_patch")).sum() == 4 * (3 + 5)
    for field in ("role", "image", "tile", "row", "col", "x0", "y0", "x1", "y1"):
        assert (a[field] == b[field]).all(), field


def test_gemma3_pooled_tokens(tiny_path):
    lm = load_model(str(tiny_path("gemma3")))
    images = [[Image.new("RGB", (60, 30))]]
    table = token_table(lm, _process(lm, images, PROMPTS[:1]), images)
    patches = table[table["role"] == role_code("image_patch")]
    assert [tuple(b) for b in _boxes(patches)] == [(0, 0, 30, 15), (30, 0, 60, 15), (0, 15, 30, 30), (30, 15, 60, 30)]
    specials = lm.tokenizer.convert_ids_to_tokens(table[table["role"] == role_code("image_special")]["token_id"].tolist())
    assert specials == ["<start_of_image>", "<end_of_image>"]


def test_text_template_and_special_roles(tiny_path):
    lm = load_model(str(tiny_path("qwen2_vl")))
    images = [[Image.new("RGB", (32, 32))], [Image.new("RGB", (32, 32))]]
    inputs = _process(lm, images)
    table = token_table(lm, inputs, images, PROMPTS).reshape(inputs["input_ids"].shape)
    for s, prompt in enumerate(PROMPTS):
        text = table[s][table["role"][s] == role_code("text")]
        assert lm.tokenizer.decode(text["token_id"].tolist()).strip() == prompt
        template = lm.tokenizer.decode(table[s][table["role"][s] == role_code("template")]["token_id"].tolist())
        assert "USER:" in template and "ASSISTANT:" in template and "circle" not in template
        is_image = np.isin(table["role"][s], [role_code("image_patch"), role_code("image_special")])
        assert ((table[s]["image"] == -1) == ~is_image).all()
    plain = token_table(lm, inputs, images).reshape(inputs["input_ids"].shape)
    assert role_code("template") not in plain["role"]
    assert ((plain["role"] == role_code("text")) == np.isin(table["role"], [role_code("text"), role_code("template")])).all()
    with pytest.raises(ValueError, match="is not in the sample's tokens"):
        token_table(lm, inputs, images, ["what shape is it ?", PROMPTS[1]])

    organism = load_model(str(tiny_path("llava")))  # word-level tokenizer, BOS from its post-processor
    images = [[Image.new("RGB", (64, 64))]]
    table = token_table(organism, _process(organism, images, PROMPTS[:1]), images, PROMPTS[:1])
    assert [ROLES[r] for r in table["role"]] == ["special"] + ["image_patch"] * 64 + ["text"] * 6


def test_text_only_models_and_errors(tiny_path, monkeypatch):
    lm = load_model(str(tiny_path("llama")))
    inputs = lm.tokenizer(["what color is the circle ?"], return_tensors="pt")
    table = token_table(lm, inputs, prompts=["color is the"])
    assert (table["image"] == -1).all() and (table["x0"] == -1).all()
    text = lm.tokenizer.decode(table["token_id"][table["role"] == role_code("text")].tolist())
    other = lm.tokenizer.decode(table["token_id"][table["role"] == role_code("template")].tolist())
    assert (text.strip(), other.replace(" ", "")) == ("color is the", "whatcircle?")
    monkeypatch.setattr(type(lm.tokenizer), "is_fast", property(lambda self: False))  # no offsets: token search
    assert (token_table(lm, inputs, prompts=["color is the"])["role"] == table["role"]).all()
    monkeypatch.undo()

    lm = load_model(str(tiny_path("llava_next")))
    images = [[Image.new("RGB", (80, 20))]]
    inputs = _process(lm, images, PROMPTS[:1])
    with pytest.raises(TokenLayoutError, match="sample 0 has 34 image tokens"):
        token_table(lm, inputs, [[Image.new("RGB", (20, 80))]])  # not the image that was processed
    lm = load_model(str(tiny_path("gemma3")))
    with pytest.raises(ValueError, match="needs `images`"):
        token_table(lm, _process(lm, [[Image.new("RGB", (32, 32))]], PROMPTS[:1]), None)
