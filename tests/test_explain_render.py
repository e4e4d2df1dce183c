"""explain.render: heatmaps land on the tokens' pixel boxes; masked, crop and colour-scale views; PNGs of top images."""

import numpy as np
import pytest
from PIL import Image

from explain.render import activation_map, colorize, render_feature, write_feature_pngs
from interp.cache.format import TOKEN_DTYPE


def one_hot(index: int, value: float = 1.0, n: int = 9) -> np.ndarray:
    a = np.zeros(n, np.float32)
    a[index] = value
    return a


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


def test_token_lands_on_its_pixel_box(grid_tokens):
    acts = one_hot(5)  # row 1, col 2: x 32..48, y 16..32
    m = activation_map(grid_tokens(3, 16), acts, (48, 48), (48, 48))
    expected = np.zeros((48, 48), np.float32)
    expected[16:32, 32:48] = 1
    np.testing.assert_array_equal(m, expected)
    big = activation_map(grid_tokens(3, 16), acts, (48, 48), (192, 192))  # drawn at display size: 4x
    assert big[64:128, 128:192].min() == 1 and big.sum() == 64 * 64


def test_overlapping_and_fractional_boxes_take_the_max():
    t = np.zeros(3, TOKEN_DTYPE)
    t[["x0", "y0", "x1", "y1"]][0] = (0, 0, 10.5, 10)
    t[["x0", "y0", "x1", "y1"]][1] = (5.2, 0, 20, 10)
    t[["x0", "y0", "x1", "y1"]][2] = (-1, -1, -1, -1)  # a row without a box (a separator): ignored
    m = activation_map(t, np.array([3.0, 2.0, 9.0]), (30, 12), (30, 12))
    row = m[0]  # a pixel belongs to a box when its centre does: 10.5 is not < 10.5
    assert row[:10].tolist() == [3] * 10 and row[10:20].tolist() == [2] * 10 and row[20:].sum() == 0
    assert m[10:].sum() == 0


def test_bilinear_is_smooth_and_peaks_on_the_token(grid_tokens):
    m = activation_map(grid_tokens(3, 16), one_hot(5), (48, 48), (192, 192), mode="bilinear")
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert 64 <= y < 128 and 128 <= x < 192 and m.max() == pytest.approx(1, abs=0.05)
    assert 0 <= m.min() and len(np.unique(m.round(3))) > 20  # a gradient, not blocks
    assert m[:, :64].max() < 0.05  # two tokens away: nothing
    with pytest.raises(ValueError, match="mode must be one of"):
        activation_map(grid_tokens(3, 16), one_hot(5), (48, 48), (48, 48), mode="cubic")


def test_masked_view_dims_exactly_outside(image, grid_tokens):
    view = render_feature(image, grid_tokens(3, 16), one_hot(5), display_size=48, dim=0.25)
    img, masked = np.asarray(image).astype(float), np.asarray(view.masked)
    inside = np.zeros((48, 48), bool)
    inside[16:32, 32:48] = True
    np.testing.assert_array_equal(masked[inside], img[inside])
    np.testing.assert_array_equal(masked[~inside], np.rint(img[~inside] * 0.25))
    assert view.scale == 1 and view.original.size == (48, 48)


def test_threshold_picks_the_active_region_and_crop(image, grid_tokens):
    acts = one_hot(5) + one_hot(0, 0.3)  # a weak token at the top left
    view = render_feature(image, grid_tokens(3, 16), acts, vmax=1.0, threshold=0.5, margin=0, display_size=48)
    assert view.crop_box == (32, 16, 48, 32)
    assert (np.asarray(view.masked)[0:16, 0:16] != np.asarray(image)[0:16, 0:16]).any()  # weak token dimmed
    wide = render_feature(image, grid_tokens(3, 16), acts, vmax=1.0, margin=0.05)  # threshold 0: both tokens
    assert wide.crop_box == (0, 0, 48, 35)  # margin 0.05 * 48 = 2.4 px, clipped to the image
    view = render_feature(image, grid_tokens(3, 16), one_hot(5), margin=0.05)
    assert view.crop_box == (29, 13, 48, 35)
    assert view.crop.size == (round(19 / 22 * 192), 192)  # upscaled with nearest: the longer side reaches 192
    expected = image.crop((29, 13, 48, 35)).resize(view.crop.size, Image.Resampling.NEAREST)
    np.testing.assert_array_equal(np.asarray(view.crop), np.asarray(expected))
    nothing = render_feature(image, grid_tokens(3, 16), np.zeros(9), display_size=48)
    assert nothing.crop_box is None and nothing.crop.size == (48, 48)
    assert (np.asarray(nothing.masked) <= np.asarray(image)).all()  # all dimmed
    np.testing.assert_array_equal(np.asarray(nothing.overlay), np.asarray(image))


def test_colour_scale_is_shared(image, grid_tokens):
    weak = render_feature(image, grid_tokens(3, 16), one_hot(5, 1.0), vmax=2.0, display_size=48)
    strong = render_feature(image, grid_tokens(3, 16), one_hot(5, 2.0), vmax=2.0, display_size=48)
    alone = render_feature(image, grid_tokens(3, 16), one_hot(5, 1.0), display_size=48)  # its own max
    at = (20, 40)  # (y, x) inside token (1, 2)
    assert tuple(np.asarray(weak.heatmap)[at]) == tuple(colorize(np.array(0.5)))
    assert tuple(np.asarray(strong.heatmap)[at]) == tuple(colorize(np.array(1.0)))
    assert tuple(np.asarray(alone.heatmap)[at]) == tuple(colorize(np.array(1.0))) and alone.vmax == 1
    assert tuple(np.asarray(weak.heatmap)[0, 0]) == tuple(colorize(np.array(0.0)))
    overlay = np.asarray(weak.overlay)  # no activation: the image shows through unchanged
    np.testing.assert_array_equal(overlay[:16], np.asarray(image)[:16])
    assert (overlay[16:32, 32:48] != np.asarray(image)[16:32, 32:48]).any()


def test_display_upscale_keeps_patches_crisp(image, grid_tokens):
    view = render_feature(image, grid_tokens(3, 16), one_hot(5))
    assert view.scale == 4
    assert {v.size for v in (view.original, view.heatmap, view.overlay, view.masked)} == {(192, 192)}
    big = np.asarray(view.original)
    np.testing.assert_array_equal(big[::4, ::4], np.asarray(image))  # nearest: every pixel a 4x4 block
    np.testing.assert_array_equal(big[3::4, 3::4], np.asarray(image))


def test_writes_pngs_of_a_features_top_samples(shapes_run, tmp_path):
    from explain.feature_reader import FeatureSources

    with FeatureSources.open(shapes_run) as src:
        f = next(f for f in np.argsort(-src.features.summary_table()["max"]) if src.features.top(f))
        paths = write_feature_pngs(src, f, tmp_path / "png", views=("overlay", "masked"))
        top = src.features.top(f)
        assert len(paths) == 2 * len(top) and all(p.exists() for p in paths)
        assert paths[0].name == f"feature{f}_top00_sample{top[0].sample}_overlay.png"
        assert Image.open(paths[0]).size == (192, 192)
        from explain.render import render_example

        view = render_example(src, f, top[-1].sample)
        assert view.vmax == pytest.approx(src.features.stats(f).max)  # shared scale: the feature's max
        with pytest.raises(ValueError, match=r"unknown views \['sketch'\]; choose from"):
            write_feature_pngs(src, f, tmp_path / "png", views=("sketch",))
