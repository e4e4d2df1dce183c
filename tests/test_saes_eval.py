"""SAE evaluation and ground-truth recovery of an SAE, checked against brute force on a tiny shapes cache."""

import numpy as np
import pytest
import torch

from interp.cache.reader import ActivationReader
from interp.cache.writer import CacheConfig, build_cache
from interp.shapes.concepts import best_threshold
from interp.shapes.ground_truth import token_concepts
from saes.evaluate import reconstruction_metrics, spliced_metrics
from saes.recovery import recover
from saes.sae import SAE, SAEConfig


@pytest.fixture(scope="module")
def shapes_cache(tiny_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval")
    return build_cache(CacheConfig(run=str(run), model=str(tiny_path("llava")), layer="0", samples=40, batch_size=8,
                                   dtype="float32"))


@pytest.fixture(scope="module")
def sae(shapes_cache):
    d = ActivationReader(shapes_cache).d
    torch.manual_seed(0)
    return SAE(SAEConfig(arch="topk", d_in=d, d_sae=64, k=4)).eval()


def test_recovery_of_an_sae_reads_its_activations_in_chunks_across_samples(shapes_cache, sae):
    reader = ActivationReader(shapes_cache)
    gt = token_concepts(reader, with_object=False)
    labels = gt.labels()
    with torch.no_grad():
        acts = sae.encode(reader.read(0, reader.n_rows))[gt.rows].numpy()
    report = recover(sae, reader, chunk_rows=37)  # chunks cut across samples
    assert [m.concept for m in report.concepts] == list(gt.concepts) and report.f1_min == 0.9
    for j, m in enumerate(report.concepts):
        assert best_threshold(acts[:, m.feature], labels[:, j])[0] == pytest.approx(m.f1)
    assert report.to_json() == recover(sae, reader).to_json()  # chunking changes nothing
    assert 0 <= report.concept_recovery <= 1 and len(report.concepts) == 32


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
    assert s["loss_on"] == "ground-truth answers to world questions" and s["loss_tokens"] > 8
    assert s["kl_spliced"] >= 0 and s["kl_zero_ablated"] > 0


def test_wrong_width_is_named(sae):
    with pytest.raises(ValueError, match=rf"this SAE takes inputs of width d_in={sae.cfg.d_in}, but got width "
                                         rf"{sae.cfg.d_in + 3}"):
        sae.check_width(torch.zeros(2, sae.cfg.d_in + 3))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 12 is open: a probe finds 24 of 32 concepts at layer 4 of the v4 "
                   "subject, and the demo's SAE recipe recovers 10-14 of them over 15 SAEs (README)")
def test_subject_sae_recovers_every_concept(tmp_path):
    """The issue's target: an SAE on the subject's image-patch activations has a feature with
    F1 >= 0.9 for >= 90% of the world's concepts (strict xfail: it fails loudly once it holds)."""
    from dataclasses import replace

    from interp.pipeline.demo import DemoConfig, demo_sae_config
    from saes.train import TrainConfig, train

    cache = build_cache(CacheConfig(run=str(tmp_path), samples=2000, batch_size=32))
    reader = ActivationReader(cache)
    res = train(replace(demo_sae_config(), d_in=reader.d), TrainConfig(steps=DemoConfig().steps, batch_size=1024,
                progress=False), reader, tmp_path)
    report = recover(res.sae, reader)
    assert report.concept_recovery >= 0.9, report.concepts
    assert report.mean_f1 > report.mean_neuron_f1 + 0.1
