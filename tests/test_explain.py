"""interp explain / score on world v2: regions, silent regions, region detection, IoU, the stores, and the
commands end to end on a shapes-world run whose features are planted concepts (so the ground truth is
known exactly), explained and judged by the oracle (the world's ground truth in the explainer's grammar)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from explain.aggregate import parse
from explain.commands import ExplainConfig, FeatureSelection, ScoreConfig, run_explain, run_score, select_features
from explain.examples import (MarkedExample, SelectionConfig, explain_examples, explain_negatives, feature_region,
                              heldout_examples, negative_examples, patch_activations, silent_region)
from explain.feature_reader import FeatureReader
from explain.prompts import CANNOT_TELL, REGION_QUESTION, GarbageAnswer, one_line, yes_no
from explain.scoring import MaskFolder, detection_metrics, iou_score, region_verdicts
from explain.store import FeatureStore, StoreError
from interp.infra.records import RecordError
from interp.shapes.concepts import auroc
from interp.shapes.organisms import organism_path
from interp.shapes.world import WorldConfig, concept_names, describe_region, sample_scene

WORLD = WorldConfig()
CONCEPTS = concept_names(WORLD)  # planted features 0..32, one per concept
CONJ, CONTEXT, RANDOM, DEAD = range(len(CONCEPTS), len(CONCEPTS) + 4)


# ---------------------------------------------------------------- a planted v2 run


def write_planted_cache(path: Path, n: int, split: str = "test", seed: int = 0) -> int:
    """A shapes-world cache on the world's own 8x8 patch grid whose rows are exact ground truth: per patch,
    the fraction of it each concept covers (interp.shapes.ground_truth.box_coverage), then 1.0 where the
    image holds a red object (for a context feature). Returns its width."""
    import h5py

    from interp.cache import format as fmt
    from interp.infra.durable import publish
    from interp.shapes.ground_truth import box_coverage

    g, p = WORLD.patches, WORLD.patch
    per = g * g
    tokens = np.zeros(n * per, fmt.TOKEN_DTYPE)
    tokens["sample"] = np.repeat(np.arange(n), per)
    tokens["position"] = 1 + np.tile(np.arange(per), n)
    tokens["role"] = fmt.role_code("image_patch")
    tokens["row"], tokens["col"] = np.divmod(np.tile(np.arange(per), n), g)
    tokens["x0"], tokens["y0"] = tokens["col"] * p, tokens["row"] * p
    tokens["x1"], tokens["y1"] = tokens["x0"] + p, tokens["y0"] + p
    boxes = np.stack([tokens[k][:per] for k in ("x0", "y0", "x1", "y1")], axis=1).astype(float)
    acts = []
    for i in range(n):
        scene = sample_scene(WORLD, i, split, seed)
        red = float(any(o.color == "red" for o in scene.objects))
        acts.append(np.c_[box_coverage(scene, boxes), np.full(per, red)])
    acts = np.concatenate(acts).astype(np.float32)
    samples = fmt.empty_samples(n)
    samples["source_index"] = np.arange(n)
    samples["image_ref"] = [f"shapes:{split}:{i}:{seed}" for i in range(n)]
    samples["width"] = samples["height"] = WORLD.image_size
    samples["n_tokens"] = samples["n_rows"] = per
    samples["row_start"] = np.arange(n) * per
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("activations", data=acts)
        f.create_dataset("tokens", data=tokens)
        f.create_dataset("samples", data=samples)
        identity = {"model": "planted", "revision": "", "layer": "layers.0", "site": "resid", "module_path": "planted",
                    "dtype": "float32", "roles": ["image_patch"], "prompt_template": "{image}", "seed": seed,
                    "data": {"kind": "shapes", "n": n, "split": split, "seed": seed, "world": WORLD.to_json()}}
        for k in fmt.IDENTITY_ATTRS:
            f.attrs[k] = json.dumps(identity[k], sort_keys=True)
        f.attrs.update({"format": fmt.FORMAT, "d": acts.shape[1], "n_rows": len(acts), "n_samples": n,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    publish(tmp, path)
    return acts.shape[1]


def make_planted_v2(run: Path, n: int = 400) -> Path:
    """Features 0..32: the world's 33 concepts exactly (ReLU of the patch's coverage minus 5%, so a feature
    fires where recovery labels the concept); 33: red circles (both words, a conjunction); 34: empty
    background in the top-right cell of images that hold a red object (context); 35: a random direction
    (fires on nearly everything); 36: dead."""
    from explain.features import FeaturesConfig, compute_features
    from interp.infra.layout import RunLayout
    from saes.sae import SAE, SAEConfig

    layout = RunLayout.of(run).mkdir()
    d = write_planted_cache(layout.cache, n)
    idx = {c: i for i, c in enumerate(CONCEPTS)}
    k = len(CONCEPTS)
    sae = SAE(SAEConfig(arch="relu", d_in=d, d_sae=k + 4, normalize=False, model_name="planted", hook_name="planted"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1e4)
        sae.b_dec.zero_()
        for i in range(k):
            sae.W_enc[i, i], sae.b_enc[i] = 1.0, -0.05
        sae.W_enc[idx["color:red"], CONJ] = sae.W_enc[idx["shape:circle"], CONJ] = 1.0
        sae.b_enc[CONJ] = -1.05
        sae.W_enc[idx["background"], CONTEXT] = sae.W_enc[idx["cell:top right"], CONTEXT] = 1.0
        sae.W_enc[d - 1, CONTEXT], sae.b_enc[CONTEXT] = 1.0, -2.5
        sae.W_enc[:, RANDOM] = torch.randn(d, generator=g).abs() / d ** 0.5
        sae.b_enc[RANDOM] = -0.3
        sae.W_dec.copy_(sae.W_enc.t())
    sae.save(layout.sae)
    compute_features(FeaturesConfig(run=str(run), top_samples=20, reservoir=40, negatives=20, progress=False))
    return run


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return make_planted_v2(tmp_path_factory.mktemp("planted-v2") / "run")


@pytest.fixture(scope="module")
def oracle_run(planted, tmp_path_factory) -> tuple[Path, dict]:
    """The planted run explained and scored by the oracle (explain_and_score, as the demo calls it)."""
    import contextlib
    import io
    import shutil

    from interp.pipeline.stages import explain_and_score

    run = tmp_path_factory.mktemp("oracle") / "run"
    shutil.copytree(planted, run)
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.time()
        summary = explain_and_score(run, explainer="oracle")
    summary["_seconds"] = time.time() - t0
    return run, summary


def records(path: Path) -> dict[int, dict]:
    return {r["feature"]: r for r in map(json.loads, path.read_text().splitlines()[1:])}


def example(index: int, acts: np.ndarray, grid_tokens, vmax: float | None = None, pre=None) -> MarkedExample:
    scene = sample_scene(WORLD, index, "test", 0)
    return MarkedExample(index, index, f"shapes:test:{index}:0", "top", scene.render(), grid_tokens(8, 8),
                         np.asarray(acts, np.float32).ravel(), float(np.max(acts)) if vmax is None else vmax, pre)


# ---------------------------------------------------------------- answers


def test_one_line_reads_explanations_and_cannot_tell():
    assert one_line("Explanation: red objects.\nThey are all red.") == "red objects"
    assert one_line('  "circles"  ') == "circles"
    assert one_line("I cannot tell what these have in common.") == CANNOT_TELL
    assert one_line("Unclear") == CANNOT_TELL
    for bad in ("", "   \n ", None, "..."):
        with pytest.raises(GarbageAnswer):
            one_line(bad)
    assert yes_no("Yes, there is.") is True and yes_no("no") is False and yes_no("maybe") is None
    assert yes_no("") is None and yes_no(None) is None


# ---------------------------------------------------------------- regions


def test_a_region_is_the_strongest_patches_of_one_cell(grid_tokens):
    acts = np.zeros((8, 8))
    acts[0:2, 0:2] = [[1.0, 0.9], [0.8, 0.2]]  # top-left cell: three patches above half the max
    acts[6, 6] = 0.7  # bottom-right cell: less activation in all
    ex = example(0, acts, grid_tokens)
    np.testing.assert_allclose(patch_activations(ex, WORLD), acts, atol=1e-6)
    region = feature_region(ex, WORLD, cutoff=0.5, patches=None)
    assert region.mask.sum() == 3 and region.mask[0:2, 0:2].sum() == 3 and not region.mask[6, 6]
    assert region.weight == pytest.approx(1.0) and region.source == "top"
    one = feature_region(ex, WORLD, cutoff=0.5, patches=1)
    assert one.mask.sum() == 1 and one.mask[0, 0]
    acts2 = np.zeros((8, 8))
    acts2[5:8, 5:8] = 0.6  # more mass in the bottom-right cell than the single strongest patch
    acts2[0, 0] = 1.0
    assert feature_region(example(0, acts2, grid_tokens), WORLD, cutoff=0.5, patches=None).mask[5:8, 5:8].all()
    assert feature_region(example(0, np.zeros((8, 8)), grid_tokens, vmax=1.0), WORLD) is None
    # a subject on another patch grid: a token's box spans four of the world's patches
    coarse = MarkedExample(0, 0, "shapes:test:0:0", "top", ex.original, grid_tokens(4, 16),
                           np.eye(1, 16, 5, dtype=np.float32).ravel(), 1.0)
    assert patch_activations(coarse, WORLD)[2:4, 2:4].min() == 1.0 and patch_activations(coarse, WORLD).sum() == 4


def test_silent_regions_are_where_the_feature_is_zero_and_near_misses_when_asked(grid_tokens):
    acts = np.zeros((8, 8))
    acts[:4, :4] = 1.0  # fires on the whole top-left cell
    pre = -np.ones((8, 8))
    pre[:4, :4] = 1.0
    pre[5, 6] = -0.01  # nearly fired here
    ex = example(1, acts, grid_tokens, pre=pre.ravel())
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = silent_region(ex, 3, WORLD, rng, source="silent")
        assert r.size == 3 and not (r.mask & (acts > 0)).any() and r.weight == 0 and r.source == "silent"
        cells = {(int(a) // 4, int(b) // 4) for a, b in np.argwhere(r.mask)}
        assert len(cells) == 1  # one position cell, like the explainer's training regions
    near = [silent_region(ex, 1, WORLD, rng, near=True) for _ in range(30)]
    assert sum(bool(r.mask[5, 6]) for r in near) >= 5  # one of the three nearest misses each time
    everywhere = example(1, np.ones((8, 8)), grid_tokens)
    assert silent_region(everywhere, 2, WORLD, rng) is None


def test_the_world_protocol_reads_only_world_sized_images(grid_tokens):
    from PIL import Image

    ex = MarkedExample(0, 0, "file:x.png", "top", Image.new("RGB", (48, 48)), grid_tokens(3, 16),
                       np.ones(9, np.float32), 1.0)
    with pytest.raises(ValueError, match=r"the world protocol describes regions of 64x64 shapes-world images, "
                                         r"but sample 0 \(file:x.png\) is 48x48: use --protocol generic"):
        patch_activations(ex, WORLD)


def test_region_verdicts_follow_the_explanation():
    from explain.examples import Region

    regions = [Region(0, "shapes:test:0:0", "top", None, np.zeros((8, 8), bool), 1.0) for _ in range(4)]
    descriptions = ["edge of small striped red circle at top left", "large red letter k at top right",
                    "empty noisy dark background at top left", "zzz"]
    assert region_verdicts(descriptions, regions, parse("a red object"), None, WORLD) == [1.0, 1.0, 0.0, None]
    assert region_verdicts(descriptions, regions, parse("something at top left"), None, WORLD) == [1.0, 0.0, 1.0, None]
    assert region_verdicts(descriptions, regions, parse("a solid object"), None, WORLD)[1] == 1.0  # glyphs are solid
    assert region_verdicts(descriptions, regions, parse(CANNOT_TELL), None, WORLD)[:3] == [0.0] * 3
    ctx = parse("empty background at top left ; the image also holds a red object")
    caps = {"shapes:test:0:0": "small red circle at bottom right"}
    assert region_verdicts(descriptions[2:3], regions[:1], ctx, caps, WORLD) == [1.0]
    assert region_verdicts(descriptions[2:3], regions[:1], ctx, {"shapes:test:0:0": "large blue star at top right"},
                           WORLD) == [0.0]


# ---------------------------------------------------------------- metrics


def test_detection_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = np.clip(y * 0.3 + rng.random(60) * 0.8, 0, 1)
    src = ["top" if i % 3 else "q0" for i in range(60)]
    d = detection_metrics(list(s), list(y), src)
    pred = s >= 0.5
    tpr, tnr = (pred & y).sum() / y.sum(), (~pred & ~y).sum() / (~y).sum()
    prec = (pred & y).sum() / pred.sum()
    assert d.balanced_accuracy == pytest.approx((tpr + tnr) / 2, abs=1e-4)
    assert d.f1 == pytest.approx(2 * prec * tpr / (prec + tpr), abs=1e-4)
    assert d.auroc == pytest.approx(auroc(s, y), abs=1e-4)
    assert d.recall_by_source["q0"] == pytest.approx(pred[y & (np.array(src) == "q0")].mean(), abs=1e-4)
    # yes/no verdicts, and unreadable ones left out
    d = detection_metrics([True, True, False, None, False], [True, True, True, False, False], ["top"] * 5)
    assert (d.n_pos, d.n_neg, d.n_unreadable, d.recall, d.specificity) == (3, 1, 1, pytest.approx(2 / 3, abs=1e-4), 1.0)


def test_iou_with_world_and_user_masks(tmp_path, grid_tokens):
    scene = sample_scene(WORLD, 3, "test", 0)
    obj = scene.objects[0]
    labels = scene.patch_labels()
    on = labels[f"color:{obj.color}"] & labels[f"cell:{obj.position}"]  # the feature marks one object's patches
    ex = example(3, on.astype(np.float32) * 5.0, grid_tokens, vmax=5.0)
    iou = iou_score([ex], f"color:{obj.color}")
    truth = np.zeros((64, 64), bool)
    for o in scene.objects:
        truth |= (o.silhouette > 0.5) if o.color == obj.color else False
    pred = np.kron(on, np.ones((8, 8), bool))
    assert iou.pixels == pytest.approx((pred & truth).sum() / (pred | truth).sum(), abs=1e-4)
    assert iou.tokens == pytest.approx(on.sum() / labels[f"color:{obj.color}"].sum(), abs=1e-4)
    assert iou_score([ex], f"color:{obj.color}").tokens == iou_score([ex], f"a {obj.color} object").tokens
    cell = iou_score([ex], f"cell:{obj.position}")  # a cell has pixels and tokens too
    assert cell.tokens == pytest.approx(on.sum() / 16, abs=1e-4) and cell.pixels is not None
    edge = iou_score([ex], "part:edge")  # a part has tokens only
    assert edge.pixels is None and edge.tokens is not None
    assert iou_score([ex], CANNOT_TELL) is None  # nothing to compare with
    from PIL import Image

    Image.fromarray(pred.astype(np.uint8) * 255).save(tmp_path / "3.png")
    user = iou_score([ex], None, masks=MaskFolder(tmp_path))
    assert (user.pixels, user.tokens, user.n_samples) == (1.0, None, 1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "3.png")
    with pytest.raises(ValueError, match=r"mask .*3.png is 10x10 but its image is 64x64: masks must have their "
                                         r"image's size"):
        iou_score([ex], None, masks=MaskFolder(tmp_path))
    with pytest.raises(FileNotFoundError, match="mask folder .*nope does not exist"):
        MaskFolder(tmp_path / "nope")


# ---------------------------------------------------------------- stores


def test_store_keeps_the_latest_record_survives_a_torn_line_and_refuses_another_sae(tmp_path):
    path = tmp_path / "s.jsonl"
    store = FeatureStore(path, {"sae_sha256": "abc"})
    store.put({"feature": 1, "status": "error", "error": "down"})
    store.put({"feature": 2, "status": "ok", "explanation": "red"})
    store.put({"feature": 1, "status": "ok", "explanation": "circle"})
    with open(path, "a") as f:
        f.write('{"feature": 3, "status": "ok", "expl')  # killed mid-write
    again = FeatureStore(path, {"sae_sha256": "abc"})
    assert set(again.ok()) == {1, 2} and not again.failed() and again.latest[1]["explanation"] == "circle"
    again.put({"feature": 3, "status": "ok", "explanation": "blue"})
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 5  # header + 4 whole records
    assert FeatureStore(path, {"sae_sha256": "abc"}).done(3, explanation="blue")
    with pytest.raises(StoreError, match=r"holds records for another SAE \(weights sha256 abc, this one xyz\)"):
        FeatureStore(path, {"sae_sha256": "xyz"})
    (tmp_path / "junk.jsonl").write_text('{"feature": 1}\n')
    with pytest.raises(StoreError, match="is not an lmmscope feature store \\(no header line\\)"):
        FeatureStore(tmp_path / "junk.jsonl", {"sae_sha256": "abc"})
    with open(path, "a") as f:  # a complete line that is not a record: the file was edited, say where
        f.write("not json\n")
    with pytest.raises(RecordError, match=r"line 6 is not a JSON object: the file was edited or corrupted"):
        FeatureStore(path, {"sae_sha256": "abc"})


# ---------------------------------------------------------------- the planted run, end to end


def test_example_selection_holds_out_what_the_explainer_saw(planted):
    cfg = SelectionConfig(explain_top=3, explain_quantile=8, explain_negatives=6, score_top=4, score_quantile=8,
                          score_negatives=6)
    with FeatureReader(planted / "features.h5") as fs:
        for f in (0, 8, 20):
            shown = explain_examples(fs, f, cfg)
            used = {p.example.sample for p in shown} | {p.example.sample for p in explain_negatives(fs, f, cfg)}
            held = heldout_examples(fs, f, used, cfg)
            neg = negative_examples(fs, f, cfg, exclude=used)
            assert len(shown) == 11 and not used & {p.example.sample for p in held}
            assert [p.source for p in shown[:3]] == ["top"] * 3
            assert {p.source for p in shown[3:]} == {"q0", "q1", "q2", "q3"}  # every band is shown
            assert {p.source for p in held} >= {"top", "q0", "q3"} and len(held) == 12
            assert len(neg) == 6 and not {p.example.sample for p in neg} & (used | {p.example.sample for p in held})


def test_the_oracle_names_every_planted_concept_exactly_and_detects_it(oracle_run):
    run, summary = oracle_run
    ex, sc = records(run / "explanations.jsonl"), records(run / "scores.jsonl")
    assert set(ex) == set(range(DEAD)) and all(r["status"] == "ok" for r in ex.values())  # the dead one skipped
    wrong = {CONCEPTS[f]: ex[f]["explanation"] for f in range(len(CONCEPTS))
             if CONCEPTS[f] != "object" and not sc[f]["names_concept"]}
    assert not wrong, wrong  # "a red object", "a letter k", "edge of an object", "something at top left", ...
    assert parse(ex[CONCEPTS.index("object")]["explanation"]).region == {"object": "yes"}
    for concept, want in (("color:red", "a red object"), ("shape:letter k", "a letter k"),
                          ("part:interior", "interior of an object"), ("cell:top left", "something at top left"),
                          ("background", "empty background"), ("tone:dark", "empty dark background")):
        assert ex[CONCEPTS.index(concept)]["explanation"] == want
    low = {CONCEPTS[f]: sc[f]["detection"]["balanced_accuracy"] for f in range(len(CONCEPTS))
           if sc[f]["detection"]["balanced_accuracy"] != 1.0}
    assert not low, low
    # the context feature: an empty top-right cell, in images that also hold a red object
    assert ex[CONTEXT]["explanation"] == "empty background at top right ; the image also holds a red object"
    assert sc[CONTEXT]["detection"]["balanced_accuracy"] >= 0.95
    assert sc[0]["detection_oracle"] == sc[0]["detection"]  # the oracle judged: no perception gap
    # the summary the demo reads
    assert summary["live_features"] == DEAD
    assert summary["explanation_accuracy"] == 1.0 and summary["detection_balanced_accuracy"] == 1.0
    # explained: the 33 concepts and the context feature; not: the random direction (it fires on nearly every
    # patch, so no silent region is left to score against) and the red-circle conjunction (its few examples
    # are mostly interior patches, and no silent region there shows another colour's interior)
    assert sc[RANDOM]["detection"]["balanced_accuracy"] is None
    assert summary["explained_live_fraction"] == round((len(CONCEPTS) + 1) / DEAD, 4)
    assert summary["unscorable_features"] == 0  # every feature fires on enough samples to hold some out
    assert summary["explained_scorable_fraction"] == summary["explained_live_fraction"]
    assert summary["detection_balanced_accuracy_all"] >= 0.95
    assert summary["matched"]["n"] == len(CONCEPTS) - 1  # recovery matches every concept but "object" (left out)
    assert summary == {**json.loads((run / "score_summary.json").read_text()), "failed": [], "_seconds": summary["_seconds"]}


def test_near_dead_features_count_as_unexplained_and_are_counted_apart():
    from explain.scoring import summarize

    def rec(ba, n_pos):
        return {"explanation": "x", "names_concept": None, "iou": None, "detection": {
            "n_pos": n_pos, "balanced_accuracy": ba, "f1": 0.0, "auroc": None, "recall_by_source": {}}}

    records = {0: rec(0.9, 16), 1: rec(0.6, 16), 2: rec(None, 0), 3: rec(None, 0)}  # 2, 3: fire on one sample
    s = summarize(records, {}, live=5)  # feature 4: live, never scored
    assert s["live_features"] == 5 and s["explained_live_fraction"] == 0.2
    assert s["unscorable_features"] == 2 and s["explained_scorable_fraction"] == round(1 / 3, 4)


def test_per_region_answers_are_recorded_and_scoring_holds_them_out(oracle_run):
    run, _ = oracle_run
    sel = SelectionConfig()  # explain_and_score uses the commands' counts
    shown, held = sel.explain_top + sel.explain_quantile, sel.score_top + sel.score_quantile
    ex, sc = records(run / "explanations.jsonl"), records(run / "scores.jsonl")
    red = CONCEPTS.index("color:red")
    raw = json.loads(ex[red]["raw"])
    assert len(raw["regions"]) == shown and all("red" in r["description"] for r in raw["regions"])
    assert len(raw["silent"]) == shown and not any("red" in r["description"] for r in raw["silent"])
    assert {r["source"] for r in raw["silent"]} == {"negative", "silent"}
    assert "negative" in ex[red]["sources"] and len(ex[red]["examples"]) == len(ex[red]["sources"])
    rec = sc[red]
    d = rec["detection"]
    assert d["n_pos"] == d["n_neg"] == held and len(rec["descriptions"]) == len(rec["verdicts"]) == 2 * held
    assert not set(rec["samples"][:held]) & set(ex[red]["examples"])  # scored on held-out samples only
    assert all("red" in t for t in rec["descriptions"][:held]) and not any("red" in t for t in rec["descriptions"][held:])
    assert rec["iou"]["tokens"] == 1.0 and rec["concepts"] == ["color:red"]
    cell = sc[CONCEPTS.index("cell:top left")]  # fires in every image: scored on regions all the same
    assert cell["detection"]["n_neg"] == held and cell["detection"]["balanced_accuracy"] == 1.0


def test_a_rerun_asks_nothing_and_a_score_of_one_feature(oracle_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(oracle_run[0], run)
    n_lines = len((run / "explanations.jsonl").read_text().splitlines())
    assert run_explain(ExplainConfig(run=str(run), explainer="oracle", progress=False)).explained == 0
    assert "0 to do" in capsys.readouterr().out
    assert len((run / "explanations.jsonl").read_text().splitlines()) == n_lines
    summary = run_score(ScoreConfig(run=str(run), selection=FeatureSelection(features=(0, 29)), progress=False))
    assert "0 to do" in capsys.readouterr().out and summary["all"]["n"] == 2 and summary["judge"] == "world:oracle"
    assert summary["live_features"] == 2 and summary["explained_live_fraction"] == 1.0
    rescored = run_score(ScoreConfig(run=str(run), selection=FeatureSelection(features=(0,)), redo=True, progress=False))
    assert rescored["matched"]["features"]["0"]["balanced_accuracy"] == 1.0


def test_records_made_with_other_examples_or_weights_are_redone(oracle_run, tmp_path, capsys):
    """A resumed stage reuses only what the same explainer, with the same weights, made from the same
    example counts: an upgraded shapes-explainer keeps its name, and a demo re-run once kept explanations
    from its predecessor, made with other counts."""
    import shutil

    from explain.explainers import weights_fingerprint

    run = tmp_path / "run"
    shutil.copytree(oracle_run[0], run)
    live = len(records(run / "explanations.jsonl"))
    fewer = ExplainConfig(run=str(run), explainer="oracle", explain_quantile=9, progress=False)
    assert run_explain(fewer).explained == live and f"{live} to do" in capsys.readouterr().out
    assert run_score(ScoreConfig(run=str(run), score_quantile=12, progress=False))["all"]["n"] == live
    assert run_score(ScoreConfig(run=str(run), score_quantile=12, progress=False))["all"]["n"] == live
    assert f"{live} of {live} features already scored" in capsys.readouterr().out
    run_score(ScoreConfig(run=str(run), progress=False))
    assert f"0 of {live} features already scored" in capsys.readouterr().out

    model = tmp_path / "model"
    model.mkdir()
    assert weights_fingerprint(str(model)) is None and weights_fingerprint("oracle") is None
    (model / "model.safetensors").write_bytes(b"one")
    first = weights_fingerprint(str(model))
    (model / "model.safetensors").write_bytes(b"two")
    assert first and weights_fingerprint(str(model)) != first
    assert weights_fingerprint("shapes-explainer") == weights_fingerprint(str(organism_path("shapes-explainer")))


def test_a_model_explainer_is_asked_in_batches_what_it_was_trained_on(planted, grid_tokens):
    """The world protocol over a backend: every region of several features in one batched call, each the
    image dimmed outside the region (as the explainer's training views) with the region question; the
    answers aggregated like the oracle's (here a backend that answers what the oracle would)."""
    from explain.backends import Reply
    from explain.explainers import WorldExplainer
    from explain.feature_reader import FeatureSources
    from interp.shapes.world import dim_outside_patches

    class Answers:
        name = "answers"

        def __init__(self):
            self.calls = []

        def complete(self, requests):
            self.calls.append(requests)
            out = []
            for r in requests:
                image, question = r.parts
                assert question == REGION_QUESTION and r.max_tokens >= 10 and image.size == (64, 64)
                ref, mask = views[image.tobytes()]
                out.append(Reply(describe_region(sample_scene(WORLD, int(ref.split(":")[2]), "test", 0), mask), 20, 9))
            return out

    sel = SelectionConfig()
    with FeatureSources.open(planted) as src:
        from explain.examples import load_marked

        items = [(load_marked(src, f, explain_examples(src.features, f, sel), pre=True),
                  load_marked(src, f, explain_negatives(src.features, f, sel), pre=True)) for f in (0, 8, 29)]
    views = {}
    for exs, negs in items:  # every view the explainer may be shown: image dimmed outside one patch
        for e in exs + negs:
            for r, c in np.ndindex(8, 8):
                m = np.zeros((8, 8))
                m[r, c] = 1
                views[dim_outside_patches(np.asarray(e.original), m, 8).tobytes()] = (e.image_ref, m)
    backend = Answers()
    explainer = WorldExplainer(backend)
    out = explainer.explain_many(items)
    assert [e.text for e in out] == ["a red object", "a circle", "something at top left"]
    assert len(backend.calls) == 1 and len(backend.calls[0]) <= 3 * 30  # one call (the backend batches it)
    assert all(e.tokens_in > 0 for e in out) and explainer.name == "world:answers"
    again = explainer.explain_many(items)  # the same regions again: answered from memory
    assert [e.text for e in again] == [e.text for e in out] and len(backend.calls) == 1


def test_a_random_v2_explainer_model_runs_the_protocol(planted, tmp_path):
    """Mechanics on a random-init v2 explainer (the shapes explainer's architecture): its answers are words of
    the world, so explanations come out (whatever they say), or a clear GarbageAnswer."""
    from explain.backends import HFBackend
    from explain.explainers import WorldExplainer
    from explain.feature_reader import FeatureSources
    from explain.examples import load_marked
    from interp.shapes.organisms.build import SPECS, build_model, build_processor

    path = tmp_path / "explainer"
    build_model(SPECS["explainer"]).save_pretrained(path)
    build_processor().save_pretrained(path)
    sel = SelectionConfig(explain_top=2, explain_quantile=2, explain_negatives=2)
    with FeatureSources.open(planted) as src:
        items = [(load_marked(src, f, explain_examples(src.features, f, sel)),
                  load_marked(src, f, explain_negatives(src.features, f, sel))) for f in (0, 29)]
    explainer = WorldExplainer(HFBackend(str(path), device="cpu", batch_size=64))
    for e in explainer.explain_many(items):
        if isinstance(e, GarbageAnswer):
            continue
        assert isinstance(e.text, str) and e.text and json.loads(e.raw)["regions"]
    assert explainer.usage.tokens_in > 0


def test_bad_input_is_named_and_nothing_is_written(planted, random_sae, tmp_path, cli):
    from explain.explainers import ExplainerOptions, make_explainer

    run = planted
    before = sorted(p.name for p in run.iterdir())
    r = cli("explain", run, "--features", "3,99", "--no-progress")
    assert r.code == 2 and "feature index out of range: [99]; this SAE has 37 features (valid indices 0..36)" in r.err
    r = cli("explain", run, "--filter", tmp_path / "none.txt")
    assert r.code == 2 and "--filter file" in r.err and "does not exist (one feature index per line)" in r.err
    r = cli("explain", run, "--batch-features", "0")
    assert r.code == 2 and "argument --batch-features: must be at least 1, got 0" in r.err
    other = tmp_path / "other"  # the run's features.h5 beside another SAE
    random_sae(34, 37, arch="relu", where=other / "sae")
    for name in ("activations.h5", "features.h5"):
        (other / name).symlink_to(run / name)
    r = cli("explain", other, "--features", "3")
    assert r.code == 2 and "features file from another SAE" in r.err
    r = cli("score", tmp_path, "--features", "3")
    assert r.code == 2 and "no features file at" in r.err
    assert sorted(p.name for p in run.iterdir()) == before
    with pytest.raises(ValueError, match="the oracle speaks the world protocol only: drop --protocol generic"):
        make_explainer("oracle", ExplainerOptions(protocol="generic"))
    with pytest.raises(ValueError, match=r"--cutoff must be in \[0, 1\], got 2"):
        ExplainerOptions(cutoff=2)
    from explain.explainers import OracleDescriber

    with pytest.raises(ValueError, match="the oracle describes shapes-world images only"):
        OracleDescriber().scene("file:/x.png")


def test_filter_file_densest_and_dead_features(planted, tmp_path):
    with FeatureReader(planted / "features.h5") as fs:
        assert select_features(fs) == (list(range(DEAD)), [DEAD])
        dens = fs.summary_table()["density"]
        assert select_features(fs, densest=2)[0] == [int(i) for i in np.argsort(-dens[:DEAD], kind="stable")[:2]]
        path = tmp_path / "filter.txt"
        path.write_text(f"# mine\n4\n{DEAD}\n\n2  # two\n")
        assert select_features(fs, filter_file=str(path)) == ([4, 2], [DEAD])
        assert select_features(fs, features="1,1,0") == ([1, 0], [])


def test_generic_explainer_on_tiny_models(tiny_path, grid_tokens):
    """Mechanics only (random weights): the generic prompt with several marked images reaches any family."""
    from explain.backends import HFBackend
    from explain.explainers import Explanation, GenericExplainer

    scene_images = [sample_scene(WORLD, i, "test", 0).render() for i in range(3)]
    acts = np.zeros(64, np.float32)
    acts[27] = 2.0
    examples = [MarkedExample(i, i, f"shapes:test:{i}:0", "top", im, grid_tokens(8, 8), acts, 2.0)
                for i, im in enumerate(scene_images)]
    for family in ("llava", "qwen2_5_vl"):
        explainer = GenericExplainer(HFBackend(str(tiny_path(family)), device="cpu"), with_originals=True,
                                     display_size=64)
        req = explainer.request(examples)
        assert len(req.images) == 6 and isinstance(req.parts[-1], str) and "cannot tell" in req.parts[-1]
        try:
            e = explainer.explain(examples)
            assert isinstance(e, Explanation) and e.tokens_in > 0 and e.text
        except GarbageAnswer:  # a random model may say nothing readable: that is reported, not a crash
            pass
        verdicts = explainer.judge("red circles", scene_images)
        assert len(verdicts) == 3 and all(v is None or 0 <= float(v) <= 1 for v in verdicts)
        assert explainer.judge(CANNOT_TELL, scene_images) == [0.0] * 3


def test_drawn_shapes_images_are_kept_and_handed_out_as_copies():
    """A run's explain and score stages show each shapes image many times: it is drawn once, and a caller
    drawing on its copy changes nobody else's."""
    from PIL import ImageDraw

    from explain.examples import _drawn_image, load_image
    from interp.cache.data import load_image as draw

    ref = "shapes:test:3:0"
    first = load_image(ref, ())
    hits = _drawn_image.cache_info().hits
    assert np.array_equal(np.asarray(first), np.asarray(draw(ref)))
    ImageDraw.Draw(first).rectangle([0, 0, 63, 63], fill=(255, 0, 0))
    again = load_image(ref, ())
    assert np.array_equal(np.asarray(again), np.asarray(draw(ref)))
    assert again is not load_image(ref, ())
    assert _drawn_image.cache_info().hits == hits + 2
