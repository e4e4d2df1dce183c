"""interp bench features: its synthetic cache is a valid cache, and the report times the real pass."""

import numpy as np
import pytest

from explain.bench_features import BenchFeaturesConfig, bench_features, random_topk_sae, write_synthetic_cache


def test_synthetic_cache_is_a_cache_the_features_pass_reads(tmp_path):
    from explain.feature_reader import FeatureReader
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.reader import ActivationReader
    from interp.infra.layout import RunLayout

    layout = RunLayout.of(tmp_path / "run").mkdir()
    write_synthetic_cache(layout.cache, rows=1000, d_in=16, tokens_per_image=64, seed=3)
    with ActivationReader(layout.cache) as r:
        assert (r.n_rows, r.d) == (1000, 16)
        table = r.samples_table
        assert len(table) == 16 and table["n_rows"].sum() == 1000 and table["n_rows"][-1] == 1000 - 15 * 64
        np.testing.assert_array_equal(table["row_start"], np.cumsum(table["n_rows"]) - table["n_rows"])
    random_topk_sae(16, 64, 4).save(layout.sae)
    out = compute_features(FeaturesConfig(run=str(layout.root), device="cpu", progress=False))
    with FeatureReader(out) as fr:
        assert fr.d_sae == 64 and fr.summary_table()["n_active"].sum() <= 1000 * 4


def test_report_has_both_sizes_and_a_sane_ratio(tmp_path):
    cfg = BenchFeaturesConfig(rows=4096, d_in=64, d_sae=1024, k=8, wide_rows=512, wide_d_in=64, wide_d_sae=4096,
                              wide_k=16, tokens_per_image=64, rounds=1, workdir=str(tmp_path))
    report = bench_features(cfg)
    small, wide = report["results"]["d_sae_1024"], report["results"]["d_sae_4096"]
    assert small["rows"] == 4096 and wide["rows"] == 512 and wide["chunk_rows"] == 2**25 // 4096
    # the pass contains the matmul, so it cannot be much faster than it (timing noise aside)
    for r in (small, wide):
        assert r["features_over_matmul"] > 0.7 and r["pass_s"] and r["matmul_s"]
    assert report["ratios"]["features_over_matmul"] == max(small["features_over_matmul"], wide["features_over_matmul"])
    assert (tmp_path / "run-1024x64" / "features.h5").exists()


def test_too_few_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="hold no whole image of 64 tokens"):
        bench_features(BenchFeaturesConfig(rows=10, d_in=8, d_sae=32, k=2, wide_rows=0))
