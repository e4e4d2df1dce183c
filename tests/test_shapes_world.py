import numpy as np
import pytest

from interp.shapes.world import (
    NUMBER_WORDS, POSITION_WORDS, TASKS, WorldConfig, WorldConfigError, caption, dim_outside, sample_scene,
    scene_questions, vocabulary,
)

CFG = WorldConfig()


def test_same_seed_same_scene_and_splits_differ():
    a, b = sample_scene(CFG, 7, "train", 0), sample_scene(CFG, 7, "train", 0)
    assert a.to_json() == b.to_json()
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert sample_scene(CFG, 7, "test", 0).to_json() != a.to_json()
    assert sample_scene(CFG, 7, "train", 1).to_json() != a.to_json()


def test_scene_invariants_over_many_samples():
    counts = {s: 0 for s in CFG.shapes} | {c: 0 for c in CFG.colors}
    n_objects = set()
    for i in range(300):
        sc = sample_scene(CFG, i)
        n_objects.add(len(sc.objects))
        cells = [(o.row, o.col) for o in sc.objects]
        assert len(set(cells)) == len(cells), "objects share a cell"
        union = np.zeros((CFG.image_size,) * 2)
        for o in sc.objects:
            counts[o.shape] += 1
            counts[o.color] += 1
            x0, y0, x1, y1 = sc.cell_box(o.row, o.col)
            ys, xs = np.nonzero(o.coverage > 0)
            # the object stays inside its own cell, and its bbox is its pixels' extent
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert o.mask.sum() > 20
            union += o.coverage
        assert union.max() <= 1.0 + 1e-9, "objects overlap"
    assert n_objects == {1, 2, 3}
    assert min(counts.values()) > 30, counts


def test_pixels_show_the_objects_colour():
    sc = sample_scene(CFG, 11)
    img = np.asarray(sc.render()).astype(int)
    for o in sc.objects:
        inside = img[o.coverage > 0.99]
        assert np.abs(inside - np.array(o.rgb)).max() <= 1
    bg = img[sum(o.coverage for o in sc.objects) == 0]
    assert (bg == sc.background).all()


def test_patch_labels_agree_with_masks():
    for i in range(50):
        sc = sample_scene(CFG, i)
        cov = sc.patch_coverage()
        lab = sc.patch_labels()
        for o in sc.objects:
            # one object per cell and one patch per cell: its patch carries its colour and shape
            assert lab[o.color][o.row, o.col] and lab[o.shape][o.row, o.col]
            assert cov[o.shape][o.row, o.col] == pytest.approx(o.coverage.mean() * CFG.grid ** 2)
        occupied = {(o.row, o.col) for o in sc.objects}
        for r in range(3):
            for c in range(3):
                assert lab["object"][r, c] == ((r, c) in occupied)
        # finer patches: fractions still sum to the object's area
        fine = sc.patch_coverage(patch_size=8)
        total = sum(o.coverage.sum() for o in sc.objects) / 64
        assert fine["object"].sum() == pytest.approx(total)


def test_answers_agree_with_the_scene():
    rng = np.random.default_rng(0)
    for i in range(200):
        sc = sample_scene(CFG, i)
        by_pos = {o.position: o for o in sc.objects}
        for qa in scene_questions(sc, rng):
            w = qa.question.split()
            if qa.task == "caption":
                assert qa.answer == caption(sc)
                assert all(o.name in qa.answer for o in sc.objects)
            elif qa.task == "color":
                (o,) = [o for o in sc.objects if o.shape == w[-2]]
                assert qa.answer == o.color
            elif qa.task == "shape":
                pos = " ".join(w[w.index("the") + 1:-1])
                assert qa.answer == by_pos[pos].shape
            elif qa.task == "where":
                (o,) = [o for o in sc.objects if o.shape == w[-2]]
                assert qa.answer == o.position and qa.answer in POSITION_WORDS.values()
            elif qa.task == "count":
                assert qa.answer == NUMBER_WORDS[len(sc.objects)]
            elif qa.task == "exists":
                color, shape = w[-3], w[-2]
                present = any(o.color == color and o.shape == shape for o in sc.objects)
                assert qa.answer == ("yes" if present else "no")
            elif qa.task == "region":
                x0, y0 = qa.highlight[:2]
                o = sc.object_at(y0 // CFG.cell, x0 // CFG.cell)
                assert qa.answer == (o.name if o else "nothing")
            assert set(qa.question.split()) | set(qa.answer.split()) <= set(vocabulary(CFG))
    assert set(TASKS) >= {"caption", "color", "shape", "where", "count", "exists", "region"}


def test_highlight_dims_outside_only():
    sc = sample_scene(CFG, 3)
    box = sc.cell_box(1, 1)
    plain, marked = np.asarray(sc.render()), np.asarray(sc.render(highlight=box))
    assert np.array_equal(plain[16:32, 16:32], marked[16:32, 16:32])
    assert (marked[:16].astype(int) < plain[:16].astype(int)).all()
    assert np.array_equal(dim_outside(plain, (0, 0, 48, 48)), plain)


@pytest.mark.parametrize("kwargs, msg", [
    ({"max_objects": 10}, "cannot place 10 non-overlapping objects"),
    ({"shapes": ("circle", "hexagon")}, "unknown shapes ['hexagon']"),
    ({"colors": ("red", "mauve")}, "unknown colors ['mauve']"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects <= max_objects"),
    ({"image_size": 50}, "not a multiple of grid"),
])
def test_impossible_configs_say_why(kwargs, msg):
    with pytest.raises(WorldConfigError, match=None) as e:
        WorldConfig(**kwargs)
    assert msg in str(e.value)


def test_unknown_split():
    with pytest.raises(ValueError, match="known"):
        sample_scene(CFG, 0, "holdout")
