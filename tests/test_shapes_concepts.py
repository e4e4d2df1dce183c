"""Scoring features against the shapes world's ground truth on arrays: AUROC and threshold F1 against brute
force, box coverage, recovery on given activations, and the recovery report's one reader."""

import json
from dataclasses import replace

import numpy as np
import pytest

from interp.shapes.concepts import (RecoveryReport, auroc, best_threshold, concept_scores, load_recovery, max_cosines,
                                    probe_directions, probe_f1s, recover_concepts, write_recovery)
from interp.shapes.ground_truth import box_coverage
from interp.shapes.world import WorldConfig, sample_scene


def test_auroc_and_threshold_f1_match_brute_force():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=300).round(1), rng.random(300) < 0.3  # rounding makes ties
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(brute)
    f1s = []
    for t in np.unique(s)[1:]:  # every rule but "all rows"
        pred = s >= t
        tp = (pred & y).sum()
        f1s.append(2 * tp / (pred.sum() + y.sum()))
    assert best_threshold(s, y)[0] == pytest.approx(max(f1s))


def test_calling_every_row_positive_detects_nothing():
    """A concept on most rows: "all rows" would score F1 2p/(1+p) = 0.93, so a feature silent on every
    row of it (or one firing everywhere alike) would count as its detector."""
    y = np.arange(1000) < 880
    silent_there = np.where(y, 0.0, 1.0)
    assert best_threshold(silent_there, y)[0] == 0.0
    assert best_threshold(np.ones(1000), y)[:3] == (0.0, 0.0, 0.0)
    detector = np.where(y, 2.0, 0.0)
    assert best_threshold(detector, y)[0] == pytest.approx(1.0)


def test_box_coverage_is_the_mean_over_the_box():
    scene = sample_scene(WorldConfig(), 5)
    boxes = np.array([[0, 0, 16, 16], [16, 16, 32, 32], [5.5, 3.2, 40, 47]])
    cov = box_coverage(scene, boxes, ("object",))
    total = sum(o.silhouette for o in scene.objects)  # "object": the filled shapes, outlines and stripes included
    assert cov[0, 0] == pytest.approx(total[0:16, 0:16].mean())
    assert cov[2, 0] == pytest.approx(total[3:47, 5:40].mean())  # fractional boxes round outwards


def _planted(n=2000, seed=0):
    """Labels of 3 concepts, activations of 6 features: feature 4 is concept 0 with noise, 1 fires on concept 1
    and half of the rest, the others random; raw neurons: 5 dims, dim 2 = concept 2 plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, 3)) < 0.3
    acts = np.maximum(rng.normal(size=(n, 6)), 0).astype(np.float32)
    acts[:, 4] = labels[:, 0] * (1 + rng.random(n)) + (rng.random(n) < 0.02)
    acts[:, 1] = labels[:, 1] | (rng.random(n) < 0.5)
    raw = rng.normal(size=(n, 5)).astype(np.float32)
    raw[:, 2] += 4 * labels[:, 2]
    return labels, acts, raw


def test_recovery_on_arrays_equals_brute_force_whatever_the_chunking():
    labels, acts, raw = _planted()
    concepts = ("a", "b", "c")
    for chunk in (37, 2000):
        chunks = lambda: ((raw[s: s + chunk], acts[s: s + chunk]) for s in range(0, len(raw), chunk))  # noqa: E731
        exhaustive = recover_concepts(chunks, concepts, labels, candidates=acts.shape[1])
        pooled = recover_concepts(chunks, concepts, labels, candidates=2)
        for j, (m, p) in enumerate(zip(exhaustive, pooled)):
            best = [best_threshold(acts[:, i], labels[:, j]) for i in range(acts.shape[1])]
            f1s = [b[0] for b in best]
            assert m.f1 == pytest.approx(max(f1s)) and f1s[m.feature] == pytest.approx(m.f1)
            f1, precision, recall, thr = best[m.feature]
            assert (m.precision, m.recall, m.threshold) == pytest.approx((precision, recall, thr))
            assert m.auroc == pytest.approx(auroc(acts[:, m.feature], labels[:, j]))
            on = acts > 0  # the candidate pool keeps at least the best "fires at all" detector
            fired_f1 = 2 * (on & labels[:, [j]]).sum(0) / (on.sum(0) + labels[:, j].sum())
            assert p.f1 >= fired_f1.max() - 1e-9 and p.concept == m.concept == concepts[j]
        assert exhaustive[0].feature == 4 and exhaustive[0].f1 > 0.95
        assert exhaustive[2].neuron_f1 > 0.9 > exhaustive[2].f1  # a raw neuron beats every feature on "c"


def test_the_recovery_report_is_written_and_read_by_one_pair_of_functions(tmp_path):
    labels, acts, raw = _planted()
    matches = recover_concepts(lambda: [(raw, acts)], ("a", "b", "c"), labels)
    report = RecoveryReport(matches, f1_min=0.9, extra={"sae_sha256": "abc"})
    path = write_recovery(report, tmp_path / "recovery.json")
    back = load_recovery(path)
    assert back.to_json() == report.to_json() and back.extra == {"sae_sha256": "abc"}
    assert back.recovered == ["a"] and back.concept_recovery == round(1 / 3, 4)
    assert back.match("a").feature == 4 and back.concept_of(4) == "a"
    assert back.matched() == {4: [("a", round(back.match("a").f1, 4))]}
    assert back.labels()[4] == "a" and set(back.by_feature()) == {m.feature for m in matches}
    with pytest.raises(KeyError, match="no feature matches concept 'z'; concepts: a, b, c"):
        back.match("z")
    raw_json = json.loads(path.read_text())
    path.write_text(json.dumps({**raw_json, "format": "something/0"}))
    with pytest.raises(ValueError, match=r"is not an lmmscope recovery report \(format 'something/0'"):
        load_recovery(path)
    with pytest.raises(FileNotFoundError, match="no recovery report at .*: make it with `interp recovery"):
        load_recovery(tmp_path / "absent.json")


def test_the_linear_ceiling_finds_what_one_direction_can_and_only_that():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(4000, 6))
    linear = raw[:, 0] + 0.5 * raw[:, 3] > 0.8  # a direction that is not a raw neuron
    xor = (raw[:, 1] > 0) ^ (raw[:, 2] > 0)  # in the activations, but in no direction
    labels = np.stack([linear, xor, np.zeros(4000, bool)], 1)
    f1 = probe_f1s(raw, labels)
    assert f1[0] > 0.95 and f1[1] < 2 / 3 + 0.02 and f1[2] == 0.0  # xor: no better than "always yes"
    # rows are split into halves for fitting: a concept present only in one half is not memorised
    only_second = np.r_[np.zeros(2000, bool), rng.random(2000) < 0.5]
    assert probe_f1s(raw, only_second[:, None])[0] < 0.7
    labels3, acts, raw3 = _planted()
    report = RecoveryReport(recover_concepts(lambda: [(raw3, acts)], ("a", "b", "c"), labels3), f1_min=0.9)
    assert report.match("c").probe_f1 > 0.9 > report.match("c").f1  # "c" is in the model, the SAE missed it
    assert report.match("b").probe_f1 < 0.9 and report.linear_ceiling == round(1 / 3, 4)
    assert RecoveryReport([replace(m, probe_f1=float("nan")) for m in report.concepts]).linear_ceiling is None


def test_concept_scores_probes_and_decoder_alignment():
    labels, acts, raw = _planted()
    rows = concept_scores(acts[:, 4], labels, ("a", "b", "c"))
    assert rows[0]["concept"] == "a" and rows[0]["f1"] > 0.95 and 0 < rows[0]["iou"] <= 1
    directions = probe_directions(raw, labels, steps=200)
    assert directions.shape == (3, 5) and np.allclose(np.linalg.norm(directions, axis=1), 1, atol=1e-5)
    assert np.argmax(np.abs(directions[2])) == 2  # the probe for "c" reads dim 2
    decoder = np.eye(5, dtype=np.float32)[[2, 0, 1]]
    assert max_cosines(decoder, directions)[2] == pytest.approx(np.abs(directions[2]).max(), abs=1e-5)
