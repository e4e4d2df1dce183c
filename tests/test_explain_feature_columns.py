"""One feature's activations from its encoder column and the pass's row statistics equal a full encode."""

import numpy as np
import pytest
import torch

from explain.feature_columns import RowStatsRecorder, check_column, feature_column, supports
from saes.sae import SAE, SAEConfig


@torch.no_grad()
def row_stats_of(sae, x):
    acts = sae.encode(x)
    rows, _ = (acts > 0).nonzero().T
    rec = RowStatsRecorder(len(x))
    rec.add(0, len(x), rows, acts[acts > 0])
    return rec.stats()


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu", "batchtopk", "matryoshka"])
def test_column_equals_full_encode(arch):
    g = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(arch=arch, d_in=64, d_sae=2048, k=16), generator=g).eval()
    with torch.no_grad():
        sae.b_enc.normal_(-3.5, 0.3, generator=g)  # some rows with fewer than k positive pre-activations
        sae.b_dec.normal_(0, 1, generator=g)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.5 * torch.rand(2048, generator=g))
    x = torch.randn(500, 64, generator=g)
    stats = row_stats_of(sae, x)
    if arch == "topk":
        assert (stats.n_active < 16).any() and (stats.n_active == 16).any()
    features = torch.randperm(2048, generator=g)[:200].tolist()
    report = check_column(sae, x, features, stats)
    assert report["membership_differs"] == 0
    assert report["max_abs_diff"] < 1e-5


def test_topk_needs_row_stats_and_folded_sae():
    sae = SAE(SAEConfig(arch="topk", d_in=8, d_sae=32, k=2))
    x = torch.randn(4, 8)
    assert feature_column(sae, x, 3, None) is None  # the fallback: a full encode
    sae.set_normalisation(torch.randn(8), 2.0)
    assert not supports(sae)


def test_recorder_fills_rows_with_no_active_feature_with_zero():
    rec = RowStatsRecorder(5)
    rec.add(2, 3, torch.tensor([0, 0, 2]), torch.tensor([0.5, 0.2, 3.0]))
    s = rec.stats()
    np.testing.assert_array_equal(s.n_active, [0, 0, 2, 0, 1])
    np.testing.assert_allclose(s.min_active, [0, 0, 0.2, 0, 3.0])


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])  # with the rows' statistics, and without them
def test_reader_fast_path_equals_re_encoding(tmp_path, tiny_path, arch):
    """FeatureSources.token_activations from the column equals the full re-encode of the sample."""
    from explain.feature_reader import FeatureSources
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.format import is_image_patch
    from interp.cache.writer import CacheConfig, build_cache
    from interp.infra.layout import RunLayout

    layout = RunLayout.of(tmp_path / "run")
    build_cache(CacheConfig(run=str(layout.root), model=str(tiny_path("llava")), layer="1", samples=12, batch_size=6,
                            part_samples=12, dtype="float32", roles=("image_patch", "text")))
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch=arch, d_in=32, d_sae=256, k=8))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
    sae.save(layout.sae)
    compute_features(FeaturesConfig(run=str(layout.root), device="cpu", progress=False))
    with FeatureSources.open(layout.root) as src:
        assert src.features.row_stats(0, 5) is not None
        live = np.flatnonzero(src.features.summary_table()["n_active"])[:40]
        assert len(live) >= 10
        for f in live:
            for ex in src.features.top(int(f))[:2]:
                tokens, fast = src.token_activations(int(f), ex.sample)
                s = src.reader.sample(ex.sample)
                with torch.no_grad():
                    full = src.sae.encode(src.reader.read(s.start, s.stop))[:, int(f)].numpy()
                slow = full[is_image_patch(s.tokens["role"])]
                assert len(tokens) == len(slow)
                np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
                assert fast.max() == pytest.approx(ex.max, rel=1e-5)
                # the pre-activations come from the same read of the rows, in the same token order
                tokens2, acts2, pre = src.token_activations(int(f), ex.sample, with_pre=True)
                np.testing.assert_array_equal(tokens2, tokens)
                np.testing.assert_array_equal(acts2, fast)
                with torch.no_grad():
                    full_pre = src.sae.pre_acts(src.reader.read(s.start, s.stop))[:, int(f)].numpy()
                np.testing.assert_allclose(pre, full_pre[is_image_patch(s.tokens["role"])], rtol=1e-5, atol=1e-5)
                assert (pre[fast > 0] > 0).all()
