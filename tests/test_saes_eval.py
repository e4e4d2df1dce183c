"""SAE evaluation and ground-truth recovery, checked against brute force on a tiny shapes cache."""

import numpy as np
import pytest
import torch

from interp.cache.writer import CacheConfig, build_cache
from interp.shapes.ground_truth import box_coverage, token_concepts
from interp.cache.reader import ActivationReader
from interp.shapes.world import WorldConfig, sample_scene
from saes.evaluate import reconstruction_metrics, spliced_metrics
from saes.recovery import auroc, best_threshold, best_threshold_f1, recover_concepts, summarize
from saes.sae import SAE, SAEConfig


@pytest.fixture(scope="module")
def shapes_cache(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "c.h5"
    return build_cache(CacheConfig(model=str(tiny_path("llava")), layer="0", n=40, batch_size=8, dtype="float32"), out)


@pytest.fixture(scope="module")
def sae(shapes_cache):
    d = ActivationReader(shapes_cache).d
    torch.manual_seed(0)
    return SAE(SAEConfig(arch="topk", d_in=d, d_sae=64, k=4)).eval()


def test_auroc_and_threshold_f1_match_brute_force():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=300).round(1), rng.random(300) < 0.3  # rounding makes ties
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(brute)
    f1s = []
    for t in np.unique(s):
        pred = s >= t
        tp = (pred & y).sum()
        f1s.append(2 * tp / (pred.sum() + y.sum()))
    assert best_threshold_f1(s, y) == pytest.approx(max(f1s))


def test_box_coverage_is_the_mean_over_the_box():
    scene = sample_scene(WorldConfig(), 5)
    boxes = np.array([[0, 0, 16, 16], [16, 16, 32, 32], [5.5, 3.2, 40, 47]])
    cov = box_coverage(scene, boxes, ("object",))
    total = sum(o.coverage for o in scene.objects)
    assert cov[0, 0] == pytest.approx(total[0:16, 0:16].mean())
    assert cov[2, 0] == pytest.approx(total[3:47, 5:40].mean())  # fractional boxes round outwards


def test_recovery_equals_brute_force(shapes_cache, sae):
    reader = ActivationReader(shapes_cache)
    gt = token_concepts(reader, with_object=False)
    labels = gt.labels()
    with torch.no_grad():
        acts = sae.encode(reader.read(0, reader.n_rows))[gt.rows].numpy()
    exhaustive = recover_concepts(sae, reader, chunk_rows=37, candidates=sae.cfg.d_sae)  # chunks cut across samples
    pooled = recover_concepts(sae, reader, chunk_rows=37)
    for j, (m, p) in enumerate(zip(exhaustive, pooled)):
        best = [best_threshold(acts[:, i], labels[:, j]) for i in range(acts.shape[1])]
        f1s = [b[0] for b in best]
        assert m.f1 == pytest.approx(max(f1s)) and f1s[m.latent] == pytest.approx(m.f1)
        f1, precision, recall, thr = best[m.latent]
        assert (m.precision, m.recall, m.threshold) == pytest.approx((precision, recall, thr))
        pred = acts[:, m.latent] >= m.threshold
        tp = (pred & labels[:, j]).sum()
        assert m.f1 == pytest.approx(2 * tp / (pred.sum() + labels[:, j].sum()))
        assert m.auroc == pytest.approx(auroc(acts[:, m.latent], labels[:, j]))
        on = acts > 0  # the candidate pool keeps at least the best "fires at all" detector
        fired_f1 = 2 * (on & labels[:, [j]]).sum(0) / (on.sum(0) + labels[:, j].sum())
        assert p.f1 >= fired_f1.max() - 1e-9 and p.concept == m.concept == gt.concepts[j]
    s = summarize(pooled, 0.9)
    assert 0 <= s["concept_recovery"] <= 1 and len(s["concepts"]) == 9


def test_reconstruction_metrics_against_brute_force(shapes_cache, sae):
    reader = ActivationReader(shapes_cache)
    m = reconstruction_metrics(sae, reader, chunk_rows=50)
    x = reader.read(0, reader.n_rows)
    with torch.no_grad():
        acts = sae.encode(x)
        fvu = ((sae.decode(acts) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert m["l0"] == pytest.approx((acts > 0).sum(1).float().mean().item())
    assert m["dead_fraction"] == pytest.approx(((acts > 0).sum(0) == 0).float().mean().item())


def test_splicing_with_error_term_changes_nothing(shapes_cache, sae):
    s = spliced_metrics(sae, ActivationReader(shapes_cache), n_samples=8, batch_size=4)
    assert s["ce_spliced_with_error"] == pytest.approx(s["ce_clean"], abs=1e-4)
    assert s["ce_zero_ablated"] != pytest.approx(s["ce_clean"], abs=1e-4)
    assert s["loss_on"] == "ground-truth caption" and s["loss_tokens"] > 8
    assert s["kl_spliced"] >= 0 and s["kl_zero_ablated"] > 0


def test_wrong_width_is_named(sae):
    with pytest.raises(ValueError, match=str(sae.cfg.d_in)):
        sae.check_width(torch.zeros(2, sae.cfg.d_in + 3))


@pytest.mark.slow
def test_subject_sae_recovers_every_concept(tmp_path):
    """The issue's target: an SAE on the subject's image-patch activations has a latent with
    F1 >= 0.9 for >= 90% of the world's colour and shape concepts."""
    from saes.train import TrainConfig, train

    cache = build_cache(CacheConfig(model="shapes-subject", layer="2", n=2000, batch_size=32), tmp_path / "acts.h5")
    reader = ActivationReader(cache)
    res = train(SAEConfig(arch="topk", d_in=reader.d, d_sae=256, k=4), TrainConfig(steps=2000, batch_size=1024,
                progress=False), reader, tmp_path / "sae")
    report = summarize(recover_concepts(res.sae, reader), 0.9)
    assert report["concept_recovery"] >= 0.9, report["concepts"]
    assert report["mean_f1"] > report["mean_neuron_f1"] + 0.1
