"""interp features: streaming statistics equal a brute-force pass, bounded memory, example lists, identity checks."""

import time

import numpy as np
import pytest
import torch

from explain.feature_reader import FeatureFileError, FeatureSources, FeatureStats
from explain.features import FeaturesConfig, compute_features
from interp.cache.writer import CacheConfig, build_cache
from interp.cache.reader import ActivationReader
from interp.model.token_map import ROLE
from saes.sae import SAE, SAEConfig

K = 5


def make_run(root, tiny_path, d_sae: int = 64, seed: int = 0):
    """A tiny LLaVA cache with image-patch and text rows (24 images, 13 rows each) and a random TopK SAE."""
    cache = root / "acts.h5"
    if not cache.exists():
        build_cache(CacheConfig(model=str(tiny_path("llava")), layer="1", n=24, batch_size=8, part_samples=24,
                                dtype="float32", roles=("image_patch", "text")), cache)
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(arch="topk", d_in=32, d_sae=d_sae, k=8))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.02)
    return cache, sae.save(root / f"sae{d_sae}-{seed}")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("features")
    cache, sae_dir = make_run(root, tiny_path)
    out = compute_features(cache, sae_dir, root / "features.h5", FeaturesConfig(k=K, negatives=6, progress=False))
    return cache, sae_dir, out


def brute_force(cache, sae_dir, chunk_rows: int = 65536):
    """Every statistic from the dense [rows, d_sae] matrix of a small cache. It is encoded in the chunks
    the streaming pass used: a matmul's rounding depends on the batch size, and these tests are exact."""
    sae = SAE.load(sae_dir)
    with ActivationReader(cache) as r, torch.no_grad():
        acts = torch.cat([sae.encode(x) for _, x in r.iter_sequential(chunk_rows)]).numpy()
        roles, samples = r.tokens["role"], r.samples
    img_max, img_mean, img_all = [], [], []
    for s in samples:
        rows = slice(s["row_start"], s["row_start"] + s["n_rows"])
        patch = acts[rows][roles[rows] == ROLE["image_patch"]]
        img_max.append(patch.max(0))
        img_mean.append(patch.mean(0))
        img_all.append(acts[rows].max(0))
    is_image = roles <= ROLE["image_special"]
    return dict(acts=acts, max=np.stack(img_max), mean=np.stack(img_mean), all=np.stack(img_all),
                share=acts[is_image].sum(0) / np.maximum(acts.sum(0), 1e-30))


def top(values: np.ndarray, f: int, k: int) -> list[int]:
    order = np.argsort(-values[:, f], kind="stable")
    return [int(i) for i in order[:k] if values[i, f] > 0]


@pytest.mark.parametrize("chunk_rows", [1, 5, None])  # 1 and 5 split every image (13 rows) across chunks
def test_streaming_equals_brute_force(run, tmp_path, chunk_rows):
    cache, sae_dir, _ = run
    cfg = FeaturesConfig(k=K, chunk_rows=chunk_rows, progress=False)
    out = compute_features(cache, sae_dir, tmp_path / "f.h5", cfg)
    with FeatureStats(out) as fs:
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
                got = fs.top_images(f, by)
                assert [e.image for e in got] == top(bf[by], f, K), (f, by)
                np.testing.assert_allclose([e.value for e in got], [bf[by][e.image, f] for e in got], rtol=1e-5)
                np.testing.assert_allclose([e.max for e in got], [bf["max"][e.image, f] for e in got], rtol=1e-6)
            assert fs.top_images(f) == fs.top_images(f, "max")  # the recorded default ranking
            # 24 images < reservoir size: the reservoir holds every activating image
            pool = {e.image for band in fs.quantile_samples(f, n_bands=2, per_band=100) for e in band.examples}
            assert pool == set(np.flatnonzero(bf["max"][:, f] > 0).tolist())
            negatives = [e.image for e in fs.negatives(f)]
            clean = np.flatnonzero(bf["all"][:, f] == 0)
            assert len(negatives) == min(20, len(clean)) and set(negatives) <= set(clean.tolist())


def test_example_lists_do_not_depend_on_chunking(run, tmp_path):
    cache, sae_dir, out = run
    other = compute_features(cache, sae_dir, tmp_path / "f.h5", FeaturesConfig(k=K, negatives=6, chunk_rows=3,
                                                                                progress=False))
    with FeatureStats(out) as a, FeatureStats(other) as b:
        for f in range(a.d_sae):  # the same images (values differ in the last bit: other matmul batch sizes)
            assert [e.image for e in a.negatives(f)] == [e.image for e in b.negatives(f)]
            bands = [[[e.image for e in band.examples] for band in x.quantile_samples(f)] for x in (a, b)]
            assert bands[0] == bands[1]


def test_quantiles_and_bands(run):
    cache, sae_dir, out = run
    acts = brute_force(cache, sae_dir)["acts"]
    with FeatureStats(out) as fs:
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
    with FeatureSources.open(out) as src:
        checked = 0
        for f in range(src.stats.d_sae):
            negatives = src.stats.negatives(f)
            assert len(negatives) <= 6
            for e in negatives:
                rows = src.reader.read(e.row_start, e.row_start + e.n_rows)
                assert (src.sae.encode(rows)[:, f] == 0).all()  # image and text rows alike
                assert e.max == e.mean == e.value == 0
                checked += 1
        assert checked > 0


def test_token_activations_match_the_top_values(run):
    _, _, out = run
    with FeatureSources.open(out) as src:
        f = next(f for f in np.argsort(-src.stats.summary_table()["max"]) if src.stats.top_images(f))
        best = src.stats.top_images(f)[0]
        tokens, acts = src.token_activations(f, best.image)
        assert (tokens["role"] == ROLE["image_patch"]).all() and len(tokens) == 9
        assert acts.max() == pytest.approx(best.max) and acts.mean() == pytest.approx(best.mean)
        with pytest.raises(ValueError, match=r"image 24 is out of range.*0\.\.23"):
            src.token_activations(f, 24)


def test_wide_sae_stays_chunk_bounded(tmp_path, tiny_path, monkeypatch):
    """100k features over 312 rows: every encode sees at most max_chunk_elements / d_sae rows, never all of them."""
    cache, sae_dir = make_run(tmp_path, tiny_path, d_sae=100_000)
    import explain.features as features_module

    seen = []
    entries = features_module.encode_entries  # the pass encodes every chunk through it (dense: it returns None)
    monkeypatch.setattr(features_module, "encode_entries",
                        lambda sae, x, buf=None: seen.append(x.shape[0]) or entries(sae, x, buf))
    t = time.perf_counter()
    out = compute_features(cache, sae_dir, tmp_path / "wide.h5",
                           FeaturesConfig(k=K, max_chunk_elements=2**22, progress=False))
    elapsed = time.perf_counter() - t
    assert max(seen) * 100_000 <= 2**22 and sum(seen) == 312 and len(seen) > 1
    assert elapsed < 20, elapsed
    with FeatureStats(out) as fs:
        assert fs.d_sae == 100_000 and fs.meta["chunk_rows"] == 2**22 // 100_000
        assert fs.summary_table()["n_active"].sum() == 312 * 8  # TopK: k active latents per row
        on_images = [f for f in np.argsort(-fs.summary_table()["max"])[:50] if fs.top_images(f)]
        assert on_images and all(fs.top_images(f)[0].max <= fs.stats(f).max for f in on_images)


def test_refuses_another_sae_and_bad_features(run, tmp_path, tiny_path):
    cache, sae_dir, out = run
    _, other = make_run(tmp_path, tiny_path, seed=1)
    with FeatureStats(out) as fs:
        fs.check_matches(sae_dir)
        with pytest.raises(FeatureFileError, match=rf"features file from another SAE.*{sae_dir.name}.*{other}"):
            fs.check_matches(other)
        for bad in (64, -1):
            with pytest.raises(ValueError, match=rf"feature {bad} is out of range.*64 features.*0\.\.63"):
                fs.top_images(bad)
        with pytest.raises(ValueError, match="out of range"):
            fs.stats(2.5)
        with pytest.raises(ValueError, match="rank images by"):
            fs.top_images(0, "median")
    with pytest.raises(FeatureFileError, match="another SAE"):
        FeatureSources.open(out, sae=other)
    other_cache = build_cache(CacheConfig(model=str(tiny_path("llava")), layer="1", n=4, batch_size=4),
                              tmp_path / "other.h5")
    with pytest.raises(FeatureFileError, match=rf"another activation cache.*{cache.name}"):
        FeatureSources.open(out, cache=other_cache)
    with pytest.raises(FeatureFileError, match="not an lmmscope features file"):
        FeatureStats(cache)
    with pytest.raises(FeatureFileError, match="no features file"):
        FeatureStats(tmp_path / "missing.h5")


def test_cli_and_crash_safety(run, tmp_path, monkeypatch, capsys):
    import interp.cli
    from explain import features

    cache, sae_dir, _ = run
    out = tmp_path / "f.h5"
    argv = ["features", "--cache", str(cache), "--sae", str(sae_dir), "--out", str(out), "--k", "3",
            "--rank-by", "mean", "--no-progress", "--device", "cpu"]
    assert interp.cli.main(argv) == 0
    assert "64 features over 312 rows of 24 images" in capsys.readouterr().out
    with FeatureStats(out) as fs:
        assert fs.rank_by == "mean" and fs.k == 3 and fs.meta["sae_cfg"]["d_sae"] == 64
        assert fs.meta["versions"]["torch"] == torch.__version__ and len(fs.meta["sae_sha256"]) == 64
        assert fs.meta["cache_identity"]["n_rows"] == 312 and fs.top_images(0) == fs.top_images(0, "mean")
        before = fs.meta["created"]
    assert interp.cli.main([*argv, "--k", "0"]) == 2 and "k must be at least 1" in capsys.readouterr().err

    def crash(*a, **k):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(features, "_put", crash)
    with pytest.raises(RuntimeError):
        compute_features(cache, sae_dir, out, FeaturesConfig(progress=False))
    with FeatureStats(out) as fs:  # the previous file is untouched
        assert fs.meta["created"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def test_image_share_without_text_rows_and_text_only_caches(run, tmp_path, tiny_path):
    _, sae_dir, _ = run
    model = str(tiny_path("llava"))
    for roles in (("image_patch",), ("text",)):
        build_cache(CacheConfig(model=model, layer="1", n=4, batch_size=4, dtype="float32", roles=roles),
                    tmp_path / f"{roles[0]}.h5")
    out = compute_features(tmp_path / "image_patch.h5", sae_dir, tmp_path / "f.h5", FeaturesConfig(progress=False))
    with FeatureStats(out) as fs:
        table = fs.summary_table()
        live = table["n_active"] > 0
        assert not fs.meta["has_text_rows"] and "no text rows" in fs.meta["note"]
        assert (table["image_share"][live] == 1).all() and np.isnan(table["image_share"][~live]).all()
    with pytest.raises(ValueError, match="no image-patch rows"):
        compute_features(tmp_path / "text.h5", sae_dir, tmp_path / "g.h5", FeaturesConfig(progress=False))
    assert not (tmp_path / "g.h5").exists()


def test_sparse_entries_equal_dense_encode():
    """encode_entries gives exactly the nonzero entries of SAE.encode, in nonzero's order; None where it cannot."""
    from explain.features import encode_entries

    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=64, d_sae=512, k=16), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5, generator=g)  # many rows with fewer than k positive pre-activations
        sae.b_dec.normal_(0, 1, generator=g)
    x = torch.randn(300, 64, generator=g)
    acts = sae.encode(x)
    rows, feats = (acts > 0).nonzero().T
    for buf in (None, torch.empty(400, 512)):
        r, f, v = encode_entries(sae, x, buf)
        assert torch.equal(r, rows) and torch.equal(f, feats) and torch.equal(v, acts[rows, feats])
    sae.set_normalisation(torch.randn(64, generator=g), 2.0)  # not folded: the dense path
    assert encode_entries(sae, x) is None
    assert encode_entries(SAE(SAEConfig(arch="relu", d_in=64, d_sae=512)), x) is None


def test_sparse_pass_writes_what_the_dense_pass_writes(run, tmp_path, monkeypatch):
    import h5py

    import explain.features as features_module

    cache, sae_dir, out = run
    monkeypatch.setattr(features_module, "encode_entries", lambda sae, x, buf=None: None)
    dense = compute_features(cache, sae_dir, tmp_path / "dense.h5", FeaturesConfig(k=K, negatives=6, progress=False))
    with h5py.File(out) as a, h5py.File(dense) as b:
        names = []
        a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset) else None)
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
