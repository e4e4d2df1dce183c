"""interp features: streaming statistics equal a brute-force pass, bounded memory, example lists, identity checks."""

import time

import numpy as np
import pytest
import torch

from explain.feature_reader import FeatureFileError, FeatureReader, FeatureSources
from explain.features import FeaturesConfig, compute_features
from interp.cache.format import is_image, is_image_patch
from interp.cache.reader import ActivationReader
from interp.cache.writer import CacheConfig, build_cache
from interp.infra.layout import RunLayout
from saes.architectures.topk import TopK
from saes.sae import SAE, SAEConfig

K = 5


def make_run(root, tiny_path, d_sae: int = 64, seed: int = 0):
    """A tiny LLaVA cache with image-patch and text rows (24 samples, 68 rows each: 64 image patches, 4 text) and a random TopK SAE."""
    cache = RunLayout(root / "made").cache
    if not cache.exists():
        build_cache(CacheConfig(run=str(root / "made"), model=str(tiny_path("llava")), layer="1", samples=24,
                                batch_size=8, part_samples=24, dtype="float32", roles=("image_patch", "text")))
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(arch="topk", d_in=32, d_sae=d_sae, k=8))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.02)
    return cache, sae.save(root / f"sae{d_sae}-{seed}")


def features_of(run, cache, sae_dir, **cfg):
    """RUN/features.h5 of a run whose cache and SAE are linked in from elsewhere."""
    layout = RunLayout(run)
    layout.link("cache", cache)
    layout.link("sae", sae_dir)
    return compute_features(FeaturesConfig(run=str(run), progress=False, **cfg))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("features")
    cache, sae_dir = make_run(root, tiny_path)
    out = features_of(root / "run", cache, sae_dir, top_samples=K, negatives=6)
    return cache, sae_dir, out


def brute_force(cache, sae_dir, chunk_rows: int = 65536):
    """Every statistic from the dense [rows, d_sae] matrix of a small cache. It is encoded in the chunks
    the streaming pass used: a matmul's rounding depends on the batch size, and these tests are exact."""
    sae = SAE.load(sae_dir)
    with ActivationReader(cache) as r, torch.no_grad():
        acts = torch.cat([sae.encode(x) for _, x in r.iter_sequential(chunk_rows)]).numpy()
        roles, samples = r.tokens["role"], list(r.iter_samples())
    img_max, img_mean, img_all = [], [], []
    for s in samples:
        rows = slice(s.start, s.stop)
        patch = acts[rows][is_image_patch(roles[rows])]
        img_max.append(patch.max(0))
        img_mean.append(patch.mean(0))
        img_all.append(acts[rows].max(0))
    return dict(acts=acts, max=np.stack(img_max), mean=np.stack(img_mean), all=np.stack(img_all),
                share=acts[is_image(roles)].sum(0) / np.maximum(acts.sum(0), 1e-30))


def top(values: np.ndarray, f: int, k: int) -> list[int]:
    order = np.argsort(-values[:, f], kind="stable")
    return [int(i) for i in order[:k] if values[i, f] > 0]


@pytest.mark.parametrize("chunk_rows", [1, 5, None])  # 1 and 5 split every sample (13 rows) across chunks
def test_streaming_equals_brute_force(run, tmp_path, chunk_rows):
    cache, sae_dir, _ = run
    out = features_of(tmp_path, cache, sae_dir, top_samples=K, chunk_rows=chunk_rows)
    with FeatureReader(out) as fs:
        bf = brute_force(cache, sae_dir, fs.meta["chunk_rows"])
        acts = bf["acts"]
        assert fs.meta["has_text_rows"] and fs.meta["note"] == ""
        table = fs.summary_table()
        np.testing.assert_array_equal(table["n_active"], (acts > 0).sum(0))
        np.testing.assert_allclose(table["density"], (acts > 0).mean(0), rtol=1e-6)
        np.testing.assert_array_equal(table["max"], acts.max(0))
        np.testing.assert_allclose(table["mean"], acts.mean(0), rtol=1e-5, atol=1e-9)
        active_mean = np.where((acts > 0).any(0), acts.sum(0) / np.maximum((acts > 0).sum(0), 1), 0)
        np.testing.assert_allclose(table["mean_active"], active_mean, rtol=1e-5)
        live = (acts > 0).any(0)
        np.testing.assert_allclose(table["image_share"][live], bf["share"][live], rtol=1e-5)
        assert np.isnan(table["image_share"][~live]).all()
        assert (table["image_share"][live] < 1).any()  # text rows count
        for f in range(fs.d_sae):
            for by in ("max", "mean"):
                got = fs.top(f, by)
                assert [e.sample for e in got] == top(bf[by], f, K), (f, by)
                np.testing.assert_allclose([e.value for e in got], [bf[by][e.sample, f] for e in got], rtol=1e-5)
                np.testing.assert_allclose([e.max for e in got], [bf["max"][e.sample, f] for e in got], rtol=1e-6)
            assert fs.top(f) == fs.top(f, "max")  # the recorded default ranking
            # 24 samples < reservoir size: the reservoir holds every activating sample
            pool = {e.sample for band in fs.quantile_samples(f, n_bands=2, per_band=100) for e in band.examples}
            assert pool == set(np.flatnonzero(bf["max"][:, f] > 0).tolist())
            negatives = [e.sample for e in fs.negatives(f)]
            clean = np.flatnonzero(bf["all"][:, f] == 0)
            assert len(negatives) == min(20, len(clean)) and set(negatives) <= set(clean.tolist())


def test_example_lists_do_not_depend_on_chunking(run, tmp_path):
    cache, sae_dir, out = run
    other = features_of(tmp_path, cache, sae_dir, top_samples=K, negatives=6, chunk_rows=3)
    with FeatureReader(out) as a, FeatureReader(other) as b:
        for f in range(a.d_sae):  # the same samples (values differ in the last bit: other matmul batch sizes)
            assert [e.sample for e in a.negatives(f)] == [e.sample for e in b.negatives(f)]
            bands = [[[e.sample for e in band.examples] for band in x.quantile_samples(f)] for x in (a, b)]
            assert bands[0] == bands[1]


def test_quantiles_and_bands(run):
    cache, sae_dir, out = run
    acts = brute_force(cache, sae_dir)["acts"]
    with FeatureReader(out) as fs:
        edges = fs.histogram(0)[0]
        ratio = edges[2] / edges[1]  # relative width of a log-spaced bin
        for f in range(fs.d_sae):
            s = fs.stats(f)
            v = np.sort(acts[:, f][acts[:, f] > 0])
            assert fs.histogram(f)[1].sum() == len(v) == s.n_active
            for q, est in s.quantiles.items():  # within one bin of the order statistic the target count lands on
                if len(v):
                    truth = v[int(np.ceil(q * len(v))) - 1]
                    assert truth / ratio <= est <= truth * ratio, (f, q, est, truth)
                else:
                    assert est == 0
            bands = fs.quantile_samples(f, n_bands=3, per_band=2)
            assert [(b.q_lo, b.q_hi) for b in bands] == [(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)]
            values = [e.value for b in bands for e in b.examples]
            assert values == sorted(values) and all(x > 0 for x in values)


def test_negatives_have_zero_activation(run):
    _, _, out = run
    with FeatureSources.open(out.parent) as src:
        checked = 0
        for f in range(src.features.d_sae):
            negatives = src.features.negatives(f)
            assert len(negatives) <= 6
            for e in negatives:
                rows = src.reader.sample_activations(e.sample)
                assert (src.sae.encode(rows)[:, f] == 0).all()  # image and text rows alike
                assert e.max == e.mean == e.value == 0
                checked += 1
        assert checked > 0


def test_token_activations_match_the_top_values(run):
    _, _, out = run
    with FeatureSources.open(out.parent) as src:
        f = next(f for f in np.argsort(-src.features.summary_table()["max"]) if src.features.top(f))
        best = src.features.top(f)[0]
        tokens, acts = src.token_activations(f, best.sample)
        assert is_image_patch(tokens["role"]).all() and len(tokens) == 64  # 8 x 8 patches
        assert acts.max() == pytest.approx(best.max) and acts.mean() == pytest.approx(best.mean)
        with pytest.raises(ValueError, match=r"sample 24 is out of range: the cache has 24 samples \(valid indices "
                                             r"0\.\.23\)"):
            src.token_activations(f, 24)


def test_wide_sae_stays_chunk_bounded(tmp_path, tiny_path, monkeypatch):
    """100k features over 1,632 rows: every encode sees at most max_chunk_elements / d_sae rows, never all of them."""
    cache, sae_dir = make_run(tmp_path, tiny_path, d_sae=100_000)
    seen = []
    entries = TopK.active_entries  # the pass encodes every chunk through it (dense: it returns None)
    monkeypatch.setattr(TopK, "active_entries",
                        lambda self, sae, x, buf=None: seen.append(x.shape[0]) or entries(self, sae, x, buf))
    t = time.perf_counter()
    out = features_of(tmp_path / "wide", cache, sae_dir, top_samples=K, max_chunk_elements=2**22)
    elapsed = time.perf_counter() - t
    assert max(seen) * 100_000 <= 2**22 and sum(seen) == 24 * 68 and len(seen) > 1
    assert elapsed < 20, elapsed
    with FeatureReader(out) as fs:
        assert fs.d_sae == 100_000 and fs.meta["chunk_rows"] == 2**22 // 100_000
        assert fs.summary_table()["n_active"].sum() == 24 * 68 * 8  # TopK: k active features per row
        on_images = [f for f in np.argsort(-fs.summary_table()["max"])[:50] if fs.top(f)]
        assert on_images and all(fs.top(f)[0].max <= fs.stats(f).max for f in on_images)


def test_refuses_another_sae_and_bad_features(run, tmp_path, tiny_path):
    cache, sae_dir, out = run
    _, other = make_run(tmp_path, tiny_path, seed=1)
    with FeatureReader(out) as fs:
        fs.check_matches(sae_dir)
        with pytest.raises(FeatureFileError, match=rf"features file from another SAE: .* was computed from the SAE "
                                                   rf"at .*run/sae \(weights sha256 \w+\), not from {other}"):
            fs.check_matches(other)
        for bad in (64, -1):
            with pytest.raises(ValueError, match=rf"feature {bad} is out of range.*64 features.*0\.\.63"):
                fs.top(bad)
        with pytest.raises(ValueError, match=r"feature 2.5 is out of range: this SAE has 64 features"):
            fs.stats(2.5)
        with pytest.raises(ValueError, match=r"rank samples by one of \('max', 'mean'\), not 'median'"):
            fs.top(0, "median")
    swapped = tmp_path / "swapped"  # the run's features.h5 beside another SAE
    RunLayout(swapped).link("features", out)
    RunLayout(swapped).link("cache", cache)
    RunLayout(swapped).link("sae", other)
    with pytest.raises(FeatureFileError, match="features file from another SAE"):
        FeatureSources.open(swapped)
    other_cache = build_cache(CacheConfig(run=str(tmp_path / "small"), model=str(tiny_path("llava")), layer="1",
                                          samples=4, batch_size=4))
    recached = tmp_path / "recached"  # ... and beside another cache
    for name, target in (("features", out), ("cache", other_cache), ("sae", sae_dir)):
        RunLayout(recached).link(name, target)
    with pytest.raises(FeatureFileError, match=r"features file from another activation cache: .* was computed from "
                                               r".*activations.h5 \(fingerprint"):
        FeatureSources.open(recached)
    with pytest.raises(FeatureFileError, match=r"is not an lmmscope features file \(format 'lmmscope.activations/3', "
                                               r"expected 'lmmscope.features/3'\)"):
        FeatureReader(cache)
    with pytest.raises(FeatureFileError, match="no features file at .*missing.h5: make one with `interp features RUN`"):
        FeatureReader(tmp_path / "missing.h5")


def test_cli_and_crash_safety(run, tmp_path, monkeypatch, cli):
    from explain import features

    cache, sae_dir, _ = run
    RunLayout(tmp_path).link("cache", cache)
    RunLayout(tmp_path).link("sae", sae_dir)
    out = tmp_path / "features.h5"
    argv = ["features", tmp_path, "--top-samples", "3", "--rank-by", "mean", "--no-progress", "--device", "cpu"]
    r = cli(*argv)
    assert r.code == 0 and "64 features over 1632 rows of 24 samples" in r.out
    with FeatureReader(out) as fs:
        assert fs.rank_by == "mean" and fs.top_samples == 3 and fs.meta["sae_cfg"]["d_sae"] == 64
        assert fs.meta["versions"]["torch"] == torch.__version__ and len(fs.meta["sae_sha256"]) == 64
        assert fs.meta["cache_identity"]["n_rows"] == 24 * 68 and fs.top(0) == fs.top(0, "mean")
        before = fs.meta["created"]
    r = cli(*argv, "--top-samples", "0")
    assert r.code == 2 and "interp features: error: --top-samples must be at least 1, got 0" in r.err

    def crash(*a, **k):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(features, "_put", crash)
    with pytest.raises(RuntimeError):
        compute_features(FeaturesConfig(run=str(tmp_path), progress=False))
    with FeatureReader(out) as fs:  # the previous file is untouched
        assert fs.meta["created"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["activations.h5", "features.h5", "sae"]


def test_image_share_without_text_rows_and_text_only_caches(run, tmp_path, tiny_path):
    _, sae_dir, _ = run
    model = str(tiny_path("llava"))
    for roles in (("image_patch",), ("text",)):
        RunLayout(tmp_path / roles[0]).link("sae", sae_dir)
        build_cache(CacheConfig(run=str(tmp_path / roles[0]), model=model, layer="1", samples=4, batch_size=4,
                                dtype="float32", roles=roles))
    out = compute_features(FeaturesConfig(run=str(tmp_path / "image_patch"), progress=False))
    with FeatureReader(out) as fs:
        table = fs.summary_table()
        live = table["n_active"] > 0
        assert not fs.meta["has_text_rows"] and "no text rows" in fs.meta["note"]
        assert (table["image_share"][live] == 1).all() and np.isnan(table["image_share"][~live]).all()
    with pytest.raises(ValueError, match="holds no image-patch rows: feature statistics rank samples by their patch "
                                         "tokens; cache with --roles image_patch"):
        compute_features(FeaturesConfig(run=str(tmp_path / "text"), progress=False))
    assert not (tmp_path / "text" / "features.h5").exists()


def test_sparse_entries_equal_dense_encode():
    """The TopK architecture's active_entries gives exactly the nonzero entries of SAE.encode, in nonzero's
    order; None where it cannot (an SAE whose normalisation is not folded, other architectures)."""
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=64, d_sae=512, k=16), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=g)  # many rows with fewer than k positive pre-activations
        sae.b_dec.normal_(0, 1, generator=g)
    x = torch.randn(300, 64, generator=g)
    acts = sae.encode(x)
    rows, feats = (acts > 0).nonzero().T
    for buf in (None, torch.empty(400, 512)):
        r, f, v = sae.arch.active_entries(sae, x, buf)
        assert torch.equal(r, rows) and torch.equal(f, feats) and torch.equal(v, acts[rows, feats])
    sae.set_normalisation(torch.randn(64, generator=g), 2.0)  # not folded: the dense path
    assert sae.arch.active_entries(sae, x) is None
    relu = SAE(SAEConfig(arch="relu", d_in=64, d_sae=512))
    assert relu.arch.active_entries(relu, x) is None


def test_sparse_pass_writes_what_the_dense_pass_writes(run, tmp_path, monkeypatch):
    import h5py

    cache, sae_dir, out = run
    monkeypatch.setattr(TopK, "active_entries", lambda self, sae, x, buf=None: None)
    dense = features_of(tmp_path, cache, sae_dir, top_samples=K, negatives=6)
    with h5py.File(out) as a, h5py.File(dense) as b:
        names = []
        a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) else None)
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
