"""What every position of a processed batch is, and which pixels of which image it stands for.

An SAE feature is only interpretable if each cached activation can be traced back to its
token: a patch of an image (which image, which tile, which row and column of that tile's
token grid, and the box it covers in the *original* image's pixels), an image separator, the
user's text, chat-template text, a special token, or padding.

The geometry replays what each family's image processor and model do (transformers 5.23 PIL
image processors, which are what runs without torchvision) with an affine `Frame` per view:
resizes scale it, crops and pads shift it. Token order and counts follow the model code
(LLaVA-NeXT unpadding and newlines, OneVision pooling, Qwen merging, Idefics3 pixel shuffle,
Gemma3 pooling), and every image's token count is checked against the processor's own
placeholders, so a mismatch raises instead of mislabelling tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from interp.cache.format import TOKEN_DTYPE, role_code
from interp.model.models import LoadedModel

NO_BOX = (-1.0, -1.0, -1.0, -1.0)


class TokenLayoutError(ValueError):
    """The batch's image tokens do not match what the model's processor would produce for these images."""


@dataclass(frozen=True)
class Frame:
    """Maps pixel coordinates of a processed view back to the original image: orig = view * scale + offset."""

    sx: float = 1.0
    sy: float = 1.0
    ox: float = 0.0
    oy: float = 0.0

    def resized(self, before: tuple[int, int], after: tuple[int, int]) -> Frame:
        """The view after resizing this one from `before` to `after` (height, width)."""
        return Frame(self.sx * before[1] / after[1], self.sy * before[0] / after[0], self.ox, self.oy)

    def moved(self, top: float, left: float) -> Frame:
        """The view whose origin is at (top, left) of this one: a crop, or padding where negative."""
        return Frame(self.sx, self.sy, self.ox + self.sx * left, self.oy + self.sy * top)

    def point(self, x: float, y: float) -> tuple[float, float]:
        return x * self.sx + self.ox, y * self.sy + self.oy

    def box(self, x0: float, y0: float, x1: float, y1: float, size: tuple[int, int]) -> tuple[float, ...]:
        """The view rectangle (x0, y0, x1, y1) as a box in original pixels, clipped to the image."""
        return clip_box(*self.point(x0, y0), *self.point(x1, y1), size)


def clip_box(x0: float, y0: float, x1: float, y1: float, size: tuple[int, int]) -> tuple[float, ...]:
    """(x0, y0, x1, y1) clipped to an image of `size` (height, width): padding-only cells get zero area."""
    h, w = size
    return min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)


@dataclass(frozen=True)
class Slot:
    """One placeholder token of an image, in sequence order."""

    role: str = "image_patch"
    tile: int = -1
    row: int = -1
    col: int = -1
    box: tuple[float, ...] = NO_BOX


SPECIAL_SLOT = Slot("image_special")


@dataclass(frozen=True)
class ImageBatch:
    inputs: Mapping
    sizes: list[tuple[int, int]]  # (height, width) of each original image, in batch order
    per_sample: list[int] | None  # images in each sample, when known


def grid_slots(frame: Frame, rows: int, cols: int, cell_h: float, cell_w: float, tile: int,
               size: tuple[int, int]) -> list[Slot]:
    """Row-major tokens of a rows x cols grid of cell_h x cell_w view pixels."""
    return [Slot("image_patch", tile, r, c, frame.box(c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h,
                                                      size)) for r in range(rows) for c in range(cols)]


def _array(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)


def _shape_only(h: int, w: int) -> np.ndarray:
    """A (1, h, w) array without memory, for transformers helpers that read only an image's shape."""
    return np.broadcast_to(np.uint8(0), (1, h, w))


def resized_size(h: int, w: int, size) -> tuple[int, int]:
    """The output size of `PilBackend.resize(image, size)` (shortest/longest edge, max box, or exact)."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    if size.get("shortest_edge") and size.get("longest_edge"):
        return tuple(get_size_with_aspect_ratio((h, w), size["shortest_edge"], size["longest_edge"]))
    if size.get("shortest_edge"):
        return tuple(get_resize_output_image_size(_shape_only(h, w), size["shortest_edge"], default_to_square=False,
                                                  input_data_format=ChannelDimension.FIRST))
    if size.get("max_height") and size.get("max_width"):
        return tuple(get_image_size_for_max_height_width((h, w), size["max_height"], size["max_width"]))
    return size["height"], size["width"]


def resize_and_crop(ip, frame: Frame, hw: tuple[int, int]) -> tuple[Frame, tuple[int, int]]:
    """The generic per-view steps of an image processor: resize to `size`, then centre-crop to `crop_size`."""
    if ip.do_resize:
        new = resized_size(*hw, ip.size)
        frame, hw = frame.resized(hw, new), new
    if getattr(ip, "do_center_crop", False):
        ch, cw = ip.crop_size["height"], ip.crop_size["width"]
        frame, hw = frame.moved((hw[0] - ch) // 2, (hw[1] - cw) // 2), (ch, cw)  # numpy center_crop's offsets
    return frame, hw


def _pad_to_square(size: tuple[int, int]) -> tuple[Frame, tuple[int, int]]:
    """`pad_to_square` of the LLaVA / OneVision processors: the image centred on a square canvas."""
    h, w = size
    side = max(h, w)
    return Frame().moved(-((side - h) // 2), -((side - w) // 2)), (side, side)


def _check_view(family: str, hw: tuple[int, int], pixel_hw: tuple[int, ...]) -> None:
    if tuple(hw) != tuple(pixel_hw):
        raise TokenLayoutError(f"{family}: replaying the image processor gives {hw[0]}x{hw[1]} views but "
                               f"pixel_values has {pixel_hw[0]}x{pixel_hw[1]}: were these inputs made with other "
                               "processor settings than the model's saved ones?")


# ------------------------------------------------------------------------------------------------ families

def _llava(lm: LoadedModel, batch: ImageBatch) -> list[list[Slot]]:
    """LLaVA 1.5: optional pad-to-square, resize, centre crop; CLS-like extra tokens first, then patches."""
    proc, ip = lm.processor, lm.processor.image_processor
    p = lm.model.config.vision_config.patch_size
    extra = proc.num_additional_image_tokens - (proc.vision_feature_select_strategy == "default")
    pixel_hw = np.shape(batch.inputs["pixel_values"])[-2:]
    out = []
    for size in batch.sizes:
        frame, hw = _pad_to_square(size) if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square") \
            else (Frame(), size)
        frame, hw = resize_and_crop(ip, frame, hw)
        _check_view(lm.family, hw, pixel_hw)
        out.append([SPECIAL_SLOT] * extra + grid_slots(frame, hw[0] // p, hw[1] // p, p, p, 0, size))
    return out


def _anyres(lm: LoadedModel, batch: ImageBatch) -> list[list[Slot]]:
    """LLaVA-NeXT and LLaVA-OneVision: a base view (tile 0), then the best-fit grid of tiles.

    OneVision samples with several images get only the padded-square base view and a newline.
    """
    ip, vis = lm.processor.image_processor, lm.model.config.vision_config
    n = vis.image_size // vis.patch_size  # patch grid of one view
    base_hw = (ip.size["height"], ip.size["width"]) if ip.size.get("height") else (ip.size["shortest_edge"],) * 2
    multi = [count > 1 for count in batch.per_sample for _ in range(count)] \
        if lm.family == "llava_onevision" and batch.per_sample else [False] * len(batch.sizes)
    pixel_hw = np.shape(batch.inputs["pixel_values"])[-2:]
    out = []
    for size, is_multi in zip(batch.sizes, multi):
        view = _pad_to_square(size) if is_multi else (Frame().resized(size, base_hw), base_hw)
        frame, hw = resize_and_crop(ip, *view)
        _check_view(lm.family, hw, pixel_hw)
        base = grid_slots(frame, n, n, hw[0] / n, hw[1] / n, 0, size)
        out.append(base + [SPECIAL_SLOT] if is_multi else base + _anyres_tiles(lm, size, n))
    return out


def _anyres_tiles(lm: LoadedModel, size: tuple[int, int], n: int) -> list[Slot]:
    """The tiles' tokens: rows of the joined, unpadded (OneVision: maybe shrunk) patch map, each ended by a newline.

    The tiles are one canvas (the image resized to fit the best grid resolution and centred with
    padding) cut into squares. The model joins their patch grids into one map, drops the rows or
    columns that are padding (`unpad_image`), and OneVision bilinearly shrinks maps larger than
    `anyres_max_N` tiles. A shrunk token covers a fractional block of patches; its tile, row and
    col are those of the patch under its centre.
    """
    import torch
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg, ip = lm.model.config, lm.processor.image_processor
    tile_px = (ip.crop_size or {}).get("height") or ip.size.get("height") or ip.size["shortest_edge"]
    best = select_best_resolution(size, ip.image_grid_pinpoints)
    fit = get_patch_output_size(_shape_only(*size), best, ChannelDimension.FIRST)
    canvas = Frame().resized(size, fit).moved(-((best[0] - fit[0]) // 2), -((best[1] - fit[1]) // 2))
    tiles_h, tiles_w = best[0] // tile_px, best[1] // tile_px
    if (tiles_h, tiles_w) != tuple(get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints,
                                                               cfg.vision_config.image_size)):
        raise TokenLayoutError(f"{lm.family}: the image processor's grid pinpoints differ from the model's")
    tiles = {(i, j): resize_and_crop(ip, canvas.moved(i * tile_px, j * tile_px), (tile_px, tile_px))
             for i in range(tiles_h) for j in range(tiles_w)}

    def point(gx: float, gy: float, end: bool) -> tuple[float, float]:
        """A point of the joined patch map (in patches), through the tile holding it, to original pixels."""
        i, j = ((min(max(math.ceil(g / n) - 1, 0), k - 1) if end else min(int(g // n), k - 1))
                for g, k in ((gy, tiles_h), (gx, tiles_w)))
        tile_frame, (th, tw) = tiles[i, j]
        return tile_frame.point((gx - j * n) * tw / n, (gy - i * n) * th / n)

    rows, cols = tiles_h * n, tiles_w * n
    kept = unpad_image(torch.empty(0, rows, cols), list(size)).shape[1:]
    top, left = (rows - kept[0]) // 2, (cols - kept[1]) // 2
    out_h, out_w = kept
    if lm.family == "llava_onevision":
        max_tiles = int(cfg.vision_aspect_ratio.strip("anyres_max_"))  # as the model parses it
        ratio = math.sqrt(kept[0] * kept[1] / (max_tiles * n**2))
        if ratio > 1.1:
            out_h, out_w = int(kept[0] // ratio), int(kept[1] // ratio)
    step_y, step_x = kept[0] / out_h, kept[1] / out_w
    slots = []
    for r in range(out_h):
        for c in range(out_w):
            gy, gx = top + r * step_y, left + c * step_x
            box = clip_box(*point(gx, gy, False), *point(gx + step_x, gy + step_y, True), size)
            cy, cx = gy + step_y / 2, gx + step_x / 2
            i, j = min(int(cy // n), tiles_h - 1), min(int(cx // n), tiles_w - 1)
            slots.append(Slot("image_patch", 1 + i * tiles_w + j, int(cy - i * n), int(cx - j * n), box))
        slots.append(SPECIAL_SLOT)
    return slots


def _qwen(lm: LoadedModel, batch: ImageBatch) -> list[list[Slot]]:
    """Qwen2-VL / Qwen2.5-VL: resized to image_grid_thw patches; each token merges merge x merge patches."""
    p = lm.processor.image_processor.patch_size
    m = lm.model.config.vision_config.spatial_merge_size
    out = []
    for size, (t, gh, gw) in zip(batch.sizes, _array(batch.inputs["image_grid_thw"]).tolist()):
        frame = Frame().resized(size, (gh * p, gw * p))
        out.append(grid_slots(frame, gh // m, gw // m, m * p, m * p, 0, size) * t)
    return out


def _idefics3(lm: LoadedModel, batch: ImageBatch) -> list[list[Slot]]:
    """Idefics3 / SmolVLM: resize to the longest edge, round up to whole tiles, split; the tiles
    (1.., row-major) come first, then the global view squashed to one tile (tile 0). The pixel
    shuffle makes each token a scale x scale block of patches."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import get_resize_output_image_size

    ip, cfg = lm.processor.image_processor, lm.model.config
    side = ip.max_image_size["longest_edge"]
    cell = cfg.vision_config.patch_size * cfg.scale_factor
    n = side // cell
    _check_view(lm.family, (side, side), np.shape(batch.inputs["pixel_values"])[-2:])
    out = []
    for size in batch.sizes:
        frame, hw = Frame(), size
        if ip.do_resize:
            new = get_resize_output_image_size(_shape_only(*hw), resolution_max_side=ip.size["longest_edge"])
            frame, hw = frame.resized(hw, new), new
        if ip.do_image_splitting:
            new = _vision_encoder_size(hw, side)
            frame, hw = frame.resized(hw, new), new
        rows, cols = (hw[0] // side, hw[1] // side) if ip.do_image_splitting and max(hw) > side else (0, 0)
        views = [(1 + r * cols + c, frame.moved(r * side, c * side)) for r in range(rows) for c in range(cols)]
        views.append((0, frame.resized(hw, (side, side))))
        out.append([slot for tile, view in views for slot in grid_slots(view, n, n, cell, cell, tile, size)])
    return out


def _vision_encoder_size(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """`Idefics3ImageProcessor.resize_for_vision_encoder`'s output size: whole tiles, aspect kept."""
    h, w = hw
    aspect = w / h
    if w >= h:
        w = math.ceil(w / side) * side
        h = math.ceil(int(w / aspect) / side) * side
    else:
        h = math.ceil(h / side) * side
        w = math.ceil(int(h * aspect) / side) * side
    return h, w


def _gemma3(lm: LoadedModel, batch: ImageBatch) -> list[list[Slot]]:
    """Gemma3: squashed to the vision size, patches average-pooled to sqrt(mm_tokens_per_image)^2 tokens."""
    ip = lm.processor.image_processor
    k = math.isqrt(lm.model.config.mm_tokens_per_image)
    hw = (ip.size["height"], ip.size["width"])
    _check_view(lm.family, hw, np.shape(batch.inputs["pixel_values"])[-2:])
    return [grid_slots(Frame().resized(size, hw), k, k, hw[0] / k, hw[1] / k, 0, size) for size in batch.sizes]


Markers = tuple[list[set[int]], list[set[int]]]


def _no_markers(lm: LoadedModel) -> Markers:
    return [], []


def _qwen_markers(lm: LoadedModel) -> Markers:
    return [{lm.model.config.vision_start_token_id}], [{lm.model.config.vision_end_token_id}]


def _gemma3_markers(lm: LoadedModel) -> Markers:
    return [{lm.model.config.boi_token_id}], [{lm.model.config.eoi_token_id}]


def _idefics3_markers(lm: LoadedModel) -> Markers:
    """<fake_token_around_image> and <row_i_col_j> or <global-img> before each view; a fake token ends the image."""
    proc, ids = lm.processor, lm.tokenizer.convert_tokens_to_ids
    fake = ids(proc.fake_image_token)
    view = {ids(getattr(proc, "global_image_token", None) or proc.global_image_tag)}
    view |= {ids(f"<row_{i}_col_{j}>") for i in range(1, 7) for j in range(1, 7)}  # the processors' 6 x 6 limit
    return [view, {fake}], [{fake}]


@dataclass(frozen=True)
class Family:
    layout: Callable[[LoadedModel, ImageBatch], list[list[Slot]]]  # the placeholder slots of every image
    markers: Callable[[LoadedModel], Markers] = _no_markers  # ids around an image's placeholders, walking outward


FAMILIES = {
    "llava": Family(_llava),
    "llava_next": Family(_anyres),
    "llava_onevision": Family(_anyres),
    "qwen2_vl": Family(_qwen, _qwen_markers),
    "qwen2_5_vl": Family(_qwen, _qwen_markers),
    "idefics3": Family(_idefics3, _idefics3_markers),
    "smolvlm": Family(_idefics3, _idefics3_markers),
    "gemma3": Family(_gemma3, _gemma3_markers),
}


# ------------------------------------------------------------------------------------------------ the table

def token_table(lm: LoadedModel, inputs: Mapping, images: Sequence[Sequence] | None = None,
                prompts: Sequence[str] | None = None, answers: Sequence[str] | None = None) -> np.ndarray:
    """One TOKEN_DTYPE row per (sample, position) of `inputs` (a processor output), sample-major.

    `images`: the PIL images given to the processor, one list per sample (needed for the pixel
    boxes unless the inputs carry `image_sizes`). `prompts`: each sample's user text; its tokens
    become "text" and the other non-special text tokens "template". Without prompts, all
    non-special, non-image tokens are "text". `answers`: each sample's answer appended after the
    prompt (interp.model.inputs.prompts); its tokens (the last occurrence) become "answer".
    Non-image rows have image/tile/row/col -1 and boxes -1; image_special rows carry their image
    index only.
    """
    ids = _array(inputs["input_ids"]).astype(np.int64)
    mask = _array(inputs["attention_mask"]).astype(bool) if "attention_mask" in inputs else np.ones(ids.shape, bool)
    table = np.zeros(ids.shape, TOKEN_DTYPE)
    table["sample"] = np.arange(ids.shape[0])[:, None]
    table["position"] = np.arange(ids.shape[1])[None, :]
    table["token_id"] = ids
    for field in ("image", "tile", "row", "col", "x0", "y0", "x1", "y1"):
        table[field] = -1
    tok = lm.tokenizer
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    table["role"] = np.where(~mask, role_code("pad"), np.where(np.isin(ids, list(special)), role_code("special"), role_code("text")))
    image_token = image_token_id(lm)
    if image_token is not None and (ids[mask] == image_token).any():
        _place_images(lm, table, ids, mask & (ids == image_token), inputs, images)
    if prompts is not None:
        if len(prompts) != len(ids):
            raise ValueError(f"got {len(prompts)} prompts for a batch of {len(ids)} samples")
        for s, prompt in enumerate(prompts):
            roles = table["role"][s]
            roles[(roles == role_code("text")) & ~_prompt_positions(tok, ids[s], mask[s], prompt)] = role_code("template")
    if answers is not None:
        if len(answers) != len(ids):
            raise ValueError(f"got {len(answers)} answers for a batch of {len(ids)} samples")
        for s, answer in enumerate(answers):
            if answer.strip():
                roles = table["role"][s]
                on = _prompt_positions(tok, ids[s], mask[s], answer, last=True)
                roles[on & np.isin(roles, [role_code("text"), role_code("template")])] = role_code("answer")
    return table.reshape(-1)


def image_token_id(lm: LoadedModel) -> int | None:
    """The placeholder id that the model replaces with image features (None for text-only models)."""
    config = getattr(lm.model, "config", None)
    return getattr(config, "image_token_id", None) if lm.is_multimodal else None


def _image_sizes(inputs: Mapping, images: Sequence[Sequence] | None) -> tuple[list[tuple[int, int]], list[int] | None]:
    if images is not None:
        return [(im.height, im.width) for sample in images for im in sample], [len(sample) for sample in images]
    if "image_sizes" in inputs:
        per_sample = _array(inputs["batch_num_images"]).tolist() if "batch_num_images" in inputs else None
        return [tuple(int(v) for v in hw) for hw in _array(inputs["image_sizes"])], per_sample
    raise ValueError("token_table needs `images` (the PIL images given to the processor, one list per sample) "
                     "to map image tokens to pixels")


def _place_images(lm: LoadedModel, table: np.ndarray, ids: np.ndarray, is_placeholder: np.ndarray,
                  inputs: Mapping, images: Sequence[Sequence] | None) -> None:
    family = FAMILIES.get(lm.family)
    if family is None:
        raise ValueError(f"token_table does not know how {lm.family} lays out image tokens; "
                         f"known families: {', '.join(FAMILIES)}")
    sizes, per_sample = _image_sizes(inputs, images)
    layouts = family.layout(lm, ImageBatch(inputs, sizes, per_sample))
    before, after = family.markers(lm)
    k = 0
    for s in range(len(ids)):
        positions = np.flatnonzero(is_placeholder[s])
        first, used = k, 0
        while used < len(positions):
            slots = layouts[k] if k < len(layouts) else []
            run = positions[used:used + len(slots)]
            if not slots or len(run) < len(slots):
                raise _mismatch(lm, s, len(positions), layouts[first:])
            _write_image(table[s], ids[s], run, slots, k - first, before, after)
            used, k = used + len(slots), k + 1
        if per_sample is not None and k - first != per_sample[s]:
            raise _mismatch(lm, s, len(positions), layouts[first:first + per_sample[s]])
    if k != len(layouts):
        raise TokenLayoutError(f"{lm.family}: {len(layouts)} images given but only {k} found in the batch's tokens")


def _mismatch(lm: LoadedModel, sample: int, found: int, layouts: list[list[Slot]]) -> TokenLayoutError:
    return TokenLayoutError(
        f"{lm.family}: sample {sample} has {found} image tokens, which does not fit its images' layouts "
        f"({[len(x) for x in layouts]} tokens each): were the inputs made by this model's processor with its saved "
        "settings (no do_image_splitting / do_pan_and_scan overrides), from these images?")


def _write_image(rows: np.ndarray, ids: np.ndarray, run: np.ndarray, slots: list[Slot], image: int,
                 before: list[set[int]], after: list[set[int]]) -> None:
    """Fill one image's placeholder rows, the non-placeholders between them (separators, row/col
    tokens), and the start/end markers just outside them."""
    span = np.arange(run[0], run[-1] + 1)
    specials = [*span[~np.isin(span, run)], *_claim(ids, run[0] - 1, -1, before), *_claim(ids, run[-1] + 1, 1, after)]
    rows["role"][specials] = role_code("image_special")
    rows["image"][specials] = image
    rows["image"][run] = image
    rows["role"][run] = [role_code(slot.role) for slot in slots]
    for field, values in zip(("tile", "row", "col"), zip(*((slot.tile, slot.row, slot.col) for slot in slots))):
        rows[field][run] = values
    for field, values in zip(("x0", "y0", "x1", "y1"), zip(*(slot.box for slot in slots))):
        rows[field][run] = values


def _claim(ids: np.ndarray, start: int, step: int, allowed: list[set[int]]) -> list[int]:
    """Positions from `start`, walking by `step`, while each id is in its position's allowed set."""
    out = []
    for i, ok in enumerate(allowed):
        pos = start + i * step
        if not 0 <= pos < len(ids) or int(ids[pos]) not in ok:
            break
        out.append(pos)
    return out


def _prompt_positions(tok, ids: np.ndarray, mask: np.ndarray, prompt: str, last: bool = False) -> np.ndarray:
    """Which positions hold the user's `prompt` (with `last`, its last occurrence: an answer after it).

    The sequence is decoded and re-encoded with offsets; when that reproduces the ids, tokens
    whose non-space characters overlap the prompt's span are the prompt's. Otherwise (lossy
    decoders), the prompt's own tokenization is searched for in the ids, with and without a
    leading space.
    """
    real = np.flatnonzero(mask)
    seq = ids[real].tolist()
    hit = np.zeros(len(ids), bool)
    text = tok.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True) if tok.is_fast else {"input_ids": None}
    start = text.rfind(prompt) if last else text.find(prompt)
    if enc["input_ids"] == seq and start >= 0:
        end = start + len(prompt)
        for pos, (a, b) in zip(real, enc["offset_mapping"]):
            piece = text[a:b]
            if piece.strip():  # a word token may carry the space before it: judge its characters
                a, b = a + len(piece) - len(piece.lstrip()), b - len(piece) + len(piece.rstrip())
                hit[pos] = a < end and b > start
            else:  # a bare space belongs to the prompt only when inside it
                hit[pos] = start <= a and b <= end
        return hit
    for variant in (prompt, " " + prompt):
        want = tok(variant, add_special_tokens=False)["input_ids"]
        starts = range(len(seq) - len(want) + 1)
        at = next((i for i in (reversed(starts) if last else starts) if seq[i:i + len(want)] == want), None)
        if want and at is not None:
            hit[real[at:at + len(want)]] = True
            return hit
    raise ValueError(f"prompt {prompt!r} is not in the sample's tokens; pass each sample's user text exactly as it "
                     "went into the processor")
