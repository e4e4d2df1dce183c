"""SAEBench-style metrics with exact labels, on worlds and dictionaries built by hand (known answers)."""

import numpy as np
import pytest
import torch

from saes import metrics

COLORS, SHAPES = 5, 4
CONCEPTS = tuple(f"c{i}" for i in range(COLORS)) + tuple(f"s{i}" for i in range(SHAPES))
D = 32


@pytest.fixture(scope="module")
def world():
    """Rows = one object each: a colour direction plus a shape direction plus noise; labels for both."""
    rng = np.random.default_rng(0)
    dirs = np.linalg.qr(rng.normal(size=(D, D)))[0][: COLORS + SHAPES]  # orthonormal concept directions
    n = 6000
    color, shape = rng.integers(0, COLORS, n), rng.integers(0, SHAPES, n)
    mag_c, mag_s = rng.uniform(0.8, 1.2, n), rng.uniform(0.8, 1.2, n)
    x = mag_c[:, None] * dirs[color] + mag_s[:, None] * dirs[COLORS + shape] + 0.05 * rng.normal(size=(n, D))
    labels = np.zeros((n, COLORS + SHAPES), bool)
    labels[np.arange(n), color] = True
    labels[np.arange(n), COLORS + shape] = True
    groups = np.arange(n) // 3  # three rows per "image"
    return dict(dirs=dirs, x=x.astype(np.float32), labels=labels, color=color, shape=shape, mag_c=mag_c,
                mag_s=mag_s, test=metrics.split_rows(groups, 0.3, seed=0))


def separate_dictionary(w):
    """One feature per colour and one per shape, firing exactly with their magnitudes (no absorption)."""
    n = len(w["x"])
    acts = np.zeros((n, COLORS + SHAPES + 7), np.float32)
    acts[np.arange(n), w["color"]] = w["mag_c"]
    acts[np.arange(n), COLORS + w["shape"]] = w["mag_s"]
    extra = np.random.default_rng(1).normal(size=(7, D))
    return acts, np.concatenate([w["dirs"], extra])


def absorbed_dictionary(w):
    """As `separate_dictionary`, but colour 0 on shape 0 is one "c0 s0" feature: the c0 and s0 features do
    not fire there (the toy model of absorption: the specific feature took the general features' job)."""
    acts, dec = separate_dictionary(w)
    both = (w["color"] == 0) & (w["shape"] == 0)
    acts[both, 0] = 0
    acts[both, COLORS] = 0
    conj = w["dirs"][0] * 1.0 + w["dirs"][COLORS]
    acts = np.concatenate([acts, np.zeros((len(acts), 1), np.float32)], 1)
    acts[both, -1] = (w["mag_c"][both] + w["mag_s"][both]) / np.linalg.norm(conj)
    return acts, np.concatenate([dec, conj[None] / np.linalg.norm(conj)])


def test_split_rows_holds_out_whole_groups():
    groups = np.repeat(np.arange(100), 4)
    test = metrics.split_rows(groups, 0.25, seed=3)
    assert test.sum() == 100 and all(len(set(test[groups == g])) == 1 for g in range(100))
    assert not np.array_equal(test, metrics.split_rows(groups, 0.25, seed=4))


def test_sparse_probing_features_against_neurons(world):
    acts, _ = separate_dictionary(world)
    sp = metrics.sparse_probing(acts, world["x"], world["labels"], CONCEPTS, world["test"])
    assert sp["sparse_probing_top1"] > 0.99 and sp["sparse_probing_top5"] > 0.99
    # the concepts are rotated off the neuron axes: one neuron cannot tell them apart, five do better
    assert sp["sparse_probing_neurons_top1"] < sp["sparse_probing_top1"] - 0.1
    assert sp["sparse_probing_neurons_top5"] > sp["sparse_probing_neurons_top1"]
    assert sp["concepts"]["c2"]["top1_features"] == [2]
    # a dictionary of noise detects nothing
    noise = np.abs(np.random.default_rng(2).normal(size=acts.shape)).astype(np.float32)
    assert metrics.sparse_probing(noise, world["x"], world["labels"], CONCEPTS, world["test"])[
        "sparse_probing_top1"] < 0.45


def test_absorption_is_zero_without_and_measured_with_a_conjunction_feature(world):
    x, labels, test = world["x"], world["labels"], world["test"]
    probes = metrics.train_probes(x[~test], labels[~test])
    acts, dec = separate_dictionary(world)
    clean = metrics.absorption(acts, x, labels, CONCEPTS, dec, np.zeros(D), test, probes)
    assert clean["absorption"] < 0.01 and clean["full_absorption"] < 0.01
    assert clean["concepts"]["c0"]["main_features"] == [0]

    acts, dec = absorbed_dictionary(world)
    ab = metrics.absorption(acts, x, labels, CONCEPTS, dec, np.zeros(D), test, probes)
    conj = dec.shape[0] - 1
    c0 = ab["concepts"]["c0"]
    # the conjunction feature is not a split of c0 (it fires only where c0 meets s0, a quarter of c0)
    assert c0["main_features"] == [0]
    share = ((world["color"] == 0) & (world["shape"] == 0))[test & labels[:, 0]].mean()  # ~1/4 of c0's rows
    assert c0["absorption"] == pytest.approx(share, abs=0.03) and c0["full_absorption"] == pytest.approx(share,
                                                                                                       abs=0.03)
    s0 = ab["concepts"]["s0"]
    assert s0["main_features"] == [COLORS] and s0["absorption"] == pytest.approx(
        ((world["color"] == 0) & (world["shape"] == 0))[test & labels[:, COLORS]].mean(), abs=0.03)
    for c in ("c1", "c4", "s3"):
        assert ab["concepts"][c]["absorption"] < 0.01
    assert conj not in ab["concepts"]["c0"]["main_features"]
    assert ab["absorption"] > clean["absorption"] + 0.04


def test_a_parent_firing_with_its_child_is_sharing_not_absorption(world):
    """A general feature that fires on every row and carries part of each concept's direction, under concept
    features that still fire (a Matryoshka parent): SAEBench's fraction counts it, ours does not."""
    x, labels, test = world["x"], world["labels"], world["test"]
    probes = metrics.train_probes(x[~test], labels[~test])
    acts, dec = separate_dictionary(world)
    parent = (world["dirs"][0] + world["dirs"][COLORS:].sum(0)) / np.sqrt(5)  # c0's direction and every shape's
    acts[:, : COLORS + SHAPES] *= 0.5
    acts = np.concatenate([acts, np.full((len(acts), 1), 1.5, np.float32)], 1)
    dec = np.concatenate([dec, parent[None]])
    c0 = metrics.absorption(acts, x, labels, CONCEPTS, dec, np.zeros(D), test, probes)["concepts"]["c0"]
    assert c0["absorption"] == 0 and c0["full_absorption"] == 0 and c0["main_missing"] == 0
    assert c0["absorption_saebench"] > 0.3


def test_conjunction_features_are_told_from_general_and_implied_ones(world):
    acts, _ = absorbed_dictionary(world)
    conj = acts.shape[1] - 1
    labels = np.concatenate([world["labels"], np.ones((len(acts), 1), bool)], 1)  # an "object" concept: all rows
    flags = metrics.conjunction_features(metrics._csr(acts), labels, 0, np.array([0, conj, 1]))
    assert flags.tolist() == [False, True, False]  # "object" covers all of c0: not a narrower concept


def test_mcc_matches_one_to_one(world):
    dirs = world["dirs"]
    perm = np.random.default_rng(0).permutation(len(dirs))
    dec = np.concatenate([dirs[perm] + 0.01, np.random.default_rng(1).normal(size=(20, D))])
    m = metrics.mcc(dec, dirs, CONCEPTS)
    assert m["mcc"] > 0.99 and m["mean_max_cosine"] > 0.99
    assert [m["matched"][c]["feature"] for c in CONCEPTS] == np.argsort(perm).tolist()
    # one decoder row close to two concepts: max cosine counts it twice, the matching once
    both = (dirs[0] + dirs[1]) / np.sqrt(2)
    m2 = metrics.mcc(np.concatenate([both[None], np.random.default_rng(2).normal(size=(5, D))]), dirs[:2])
    assert m2["mean_max_cosine"] == pytest.approx(2 ** -0.5, abs=1e-3) and m2["mcc"] < m2["mean_max_cosine"] - 0.1


def test_encode_sparse_equals_the_dense_encode():
    from saes.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(arch="topk", d_in=16, d_sae=64, k=3), generator=torch.Generator().manual_seed(0))
    x = torch.randn(100, 16)
    with torch.no_grad():
        dense = sae.encode(x).numpy()
    got = metrics.encode_sparse(sae, x, chunk_rows=33).toarray()  # chunked matmuls: equal up to rounding
    assert np.array_equal(got > 0, dense > 0) and np.allclose(got, dense, atol=1e-6)


def test_dictionary_metrics_gives_every_benchmark_key(world):
    acts, dec = absorbed_dictionary(world)
    out = metrics.dictionary_metrics(acts, world["x"], world["labels"], CONCEPTS, dec, np.zeros(D), world["test"])
    for key in ("absorption", "absorption_saebench", "full_absorption", "sparse_probing_top1", "sparse_probing_top5", "mcc",
                "mean_max_cosine", "mean_split_features"):
        assert isinstance(out[key], float), key
    assert set(out["per_concept"]) == set(CONCEPTS)


def test_features_per_concept_counts_the_splits(world):
    acts, _ = separate_dictionary(world)
    assert metrics.features_per_concept(acts, world["labels"]) == 1.0
    acts, _ = absorbed_dictionary(world)  # "c0 s0" is a precise feature of both c0 and s0
    assert metrics.features_per_concept(acts, world["labels"]) == pytest.approx(1 + 2 / 9, abs=1e-3)
