"""interp explain / score: aggregation, judge questions, metrics, IoU, the stores, and the commands end to end
on a shapes-world run whose SAE features are planted concept probes (so the ground truth is known)."""

import json

import numpy as np
import pytest

from explain.commands import ExplainConfig, FeatureSelection, ScoreConfig, run_explain, run_score, select_features
from explain.examples import MarkedExample, SelectionConfig, explain_examples, heldout_examples, negative_examples
from explain.feature_reader import FeatureReader
from explain.prompts import (CANNOT_TELL, GarbageAnswer, WorldTerms, aggregate_regions, judge_questions, one_line,
                             world_terms, yes_no)
from explain.scoring import MaskFolder, detection_metrics, iou_score
from explain.store import FeatureStore, StoreError
from interp.infra.records import RecordError
from interp.shapes.concepts import auroc
from interp.shapes.world import WorldConfig, sample_scene

CONCEPTS = ("red", "green", "blue", "yellow", "purple", "circle", "square", "triangle", "cross")


# ---------------------------------------------------------------- answers and aggregation


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


def test_world_terms_and_aggregation():
    assert world_terms("Red circles and crosses") == WorldTerms(("red",), ("circle", "cross"))
    agg = lambda answers, **kw: aggregate_regions(answers, **kw).text()  # noqa: E731
    assert agg(["red circle", "red square", "red cross"]) == "red"
    assert agg(["red circle", "blue circle", "green circle", "yellow circle"]) == "circle"
    assert agg(["red circle", "red circle", "red circle", "blue square"]) == "red circle"
    assert agg(["red circle", "blue square", "green cross", "purple triangle"]) == CANNOT_TELL
    assert agg(["nothing", "nothing", "nothing", "red circle"]) == "nothing"
    assert agg([]) == CANNOT_TELL
    # weak examples (a feature firing a little on anything) count less than strong ones
    answers = ["yellow circle", "yellow square", "red cross", "blue triangle", "green square"]
    assert agg(answers) == CANNOT_TELL
    assert agg(answers, weights=[1.0, 0.9, 0.1, 0.1, 0.1]) == "yellow"
    with pytest.raises(ValueError, match="one positive weight per answer"):
        aggregate_regions(answers, weights=[1.0])


def test_judge_questions_cover_what_the_explanation_allows():
    world = WorldConfig()
    assert judge_questions(world_terms("red circle")) == ["is there a red circle ?"]
    assert judge_questions(world_terms("red")) == [f"is there a red {s} ?" for s in world.shapes]
    assert judge_questions(world_terms("circles")) == [f"is there a {c} circle ?" for c in world.colors]
    assert judge_questions(world_terms(CANNOT_TELL)) == [] and judge_questions(world_terms("nothing")) == []


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
    world = WorldConfig()
    scene = sample_scene(world, 3, "test", 0)
    obj = scene.objects[0]
    acts = np.zeros(9, np.float32)
    acts[obj.row * 3 + obj.col] = 5.0
    ex = MarkedExample(0, 3, "shapes:test:3:0", "top", scene.render(), grid_tokens(), acts, 5.0)
    iou = iou_score([ex], obj.color)
    truth = np.zeros((48, 48), bool)
    for o in scene.objects:
        truth |= o.mask if o.color == obj.color else False
    cell = np.zeros((48, 48), bool)
    cell[obj.row * 16:(obj.row + 1) * 16, obj.col * 16:(obj.col + 1) * 16] = True
    assert iou.pixels == pytest.approx((cell & truth).sum() / (cell | truth).sum(), abs=1e-4)
    same_colour = sum(o.color == obj.color for o in scene.objects)
    assert iou.tokens == pytest.approx(1 / same_colour, abs=1e-4)  # the feature marks one of them
    assert iou_score([ex], CANNOT_TELL) is None  # nothing to compare with
    # user masks: DIR/{source_index}.png
    from PIL import Image

    Image.fromarray(cell.astype(np.uint8) * 255).save(tmp_path / "3.png")
    user = iou_score([ex], None, masks=MaskFolder(tmp_path))
    assert (user.pixels, user.tokens, user.n_samples) == (1.0, None, 1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "3.png")
    with pytest.raises(ValueError, match=r"mask .*3.png is 10x10 but its image is 48x48: masks must have their "
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


# ---------------------------------------------------------------- a shapes run with planted concept features


def test_example_selection_holds_out_what_the_explainer_saw(planted_run):
    cfg = SelectionConfig(explain_top=3, explain_quantile=8, score_top=4, score_quantile=8, score_negatives=6)
    with FeatureReader(planted_run / "features.h5") as fs:
        for f in (0, 5, 9):
            shown = explain_examples(fs, f, cfg)
            used = {p.example.sample for p in shown}
            held = heldout_examples(fs, f, used, cfg)
            neg = negative_examples(fs, f, cfg)
            assert len(shown) == len(used) == 11 and not used & {p.example.sample for p in held}
            assert [p.source for p in shown[:3]] == ["top"] * 3
            assert {p.source for p in shown[3:]} == {"q0", "q1", "q2", "q3"}  # every band is shown
            assert {p.source for p in held} >= {"top", "q0", "q3"} and len(held) == 12
            assert len(neg) == 6 and not {p.example.sample for p in neg} & (used | {p.example.sample for p in held})


def test_explain_and_score_name_the_planted_concepts(planted_run_copy, capsys):
    run = planted_run_copy
    assert not run_explain(ExplainConfig(run=str(run), progress=False)).failed
    out = capsys.readouterr().out
    assert "skipping 1 dead features" in out and "11 to do" in out
    store = FeatureStore(run / "explanations.jsonl", {"sae_sha256": FeatureReader(run / "features.h5").meta["sae_sha256"]})
    ok = store.ok()
    assert set(ok) == set(range(11))
    for f in ok.values():
        assert f["tokens_in"] > 0 and f["tokens_out"] > 0 and f["seconds"] > 0 and 10 <= len(f["examples"]) <= 15
    named = [c in ok[i]["explanation"].split() for i, c in enumerate(CONCEPTS)]
    assert sum(named) >= 8, {i: ok[i]["explanation"] for i in range(9)}
    # re-run: nothing is asked again
    n_lines = len((run / "explanations.jsonl").read_text().splitlines())
    assert run_explain(ExplainConfig(run=str(run), progress=False)).explained == 0
    assert "0 to do" in capsys.readouterr().out
    assert len((run / "explanations.jsonl").read_text().splitlines()) == n_lines
    assert json.loads((run / "explain_run.json").read_text())["command"] == "explain"

    selection = FeatureSelection(features=(0, 5, 7, 9))
    summary = run_score(ScoreConfig(run=str(run), selection=selection, progress=False))
    assert summary == {**json.loads((run / "score_summary.json").read_text()), "failed": []}
    m = summary["matched"]
    assert m["n"] == 3 and m["concept_accuracy"] >= 2 / 3 and m["balanced_accuracy"] >= 0.8, m
    assert summary["all"]["n"] == 4 and summary["judge"] == "world:shapes-explainer"
    for f, r in m["features"].items():
        assert r["iou_tokens"] is not None and r["iou_tokens"] > 0.5, (f, r)
    scores = FeatureStore(run / "scores.jsonl", {"sae_sha256": store.header["sae_sha256"]}).ok()
    rec = scores[0]
    assert rec["detection"]["n_pos"] > 0 and rec["detection"]["n_neg"] > 0 and rec["tokens_in"] > 0
    assert not set(rec["samples"]) & set(ok[0]["examples"])  # scored on held-out samples only
    run_score(ScoreConfig(run=str(run), selection=selection, progress=False))
    assert "0 to do" in capsys.readouterr().out


def test_bad_input_is_named_and_nothing_is_written(planted_run, random_sae, tmp_path, cli):
    run = planted_run
    before = sorted(p.name for p in run.iterdir())
    r = cli("explain", run, "--features", "3,99", "--no-progress")
    assert r.code == 2 and "feature index out of range: [99]; this SAE has 12 features (valid indices 0..11)" in r.err
    r = cli("explain", run, "--filter", tmp_path / "none.txt")
    assert r.code == 2 and "--filter file" in r.err and "does not exist (one feature index per line)" in r.err
    other = tmp_path / "other"  # the run's features.h5 beside another SAE
    random_sae(128, 12, arch="relu", where=other / "sae")
    for name in ("activations.h5", "features.h5"):
        (other / name).symlink_to(run / name)
    r = cli("explain", other, "--features", "3")
    assert r.code == 2 and "features file from another SAE" in r.err
    r = cli("score", tmp_path, "--features", "3")
    assert r.code == 2 and "no features file at" in r.err
    assert sorted(p.name for p in run.iterdir()) == before


def test_filter_file_densest_and_dead_features(planted_run, tmp_path):
    with FeatureReader(planted_run / "features.h5") as fs:
        assert select_features(fs) == (list(range(11)), [11])
        dens = fs.summary_table()["density"]
        assert select_features(fs, densest=2)[0] == [int(i) for i in np.argsort(-dens[:11], kind="stable")[:2]]
        path = tmp_path / "filter.txt"
        path.write_text("# mine\n4\n11\n\n2  # two\n")
        assert select_features(fs, filter_file=str(path)) == ([4, 2], [11])
        assert select_features(fs, features="1,1,0") == ([1, 0], [])


def test_generic_explainer_on_tiny_models(tiny_path, grid_tokens):
    """Mechanics only (random weights): the generic prompt with several marked images reaches any family."""
    from explain.backends import HFBackend
    from explain.explainers import Explanation, GenericExplainer

    scene_images = [sample_scene(WorldConfig(), i, "test", 0).render() for i in range(3)]
    acts = np.zeros(9, np.float32)
    acts[4] = 2.0
    examples = [MarkedExample(i, i, f"shapes:test:{i}:0", "top", im, grid_tokens(), acts, 2.0)
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
