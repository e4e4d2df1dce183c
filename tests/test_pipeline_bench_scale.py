"""interp bench scale: the projection's arithmetic, the memory guard, and (slow) every stage on a small model."""

import json
import math

import pytest

from interp.pipeline.bench_scale import (BenchScaleConfig, ReferenceRun, _check_memory, bench_scale,
                                         predicted_train_peak_gb, projection)


def test_projection_follows_its_formula():
    ref = ReferenceRun(samples=1000, image_tokens=2880, text_tokens=120, gpus=8, gpu_flops=1e15, mfu=0.5)
    p = projection(ref, measured_step_over_matmul=1.5)
    tokens = 1000 * 3000
    assert p["tokens"] == tokens
    assert p["forward_flops"] == pytest.approx(tokens * 2 * ref.model_params * 25 / 32)
    assert p["sae_train_flops"] == pytest.approx(tokens * 1.5 * 2 * 4096 * 131072)
    node = 8 * 1e15 * 0.5
    total = p["forward_flops"] + p["sae_train_flops"] + p["features_flops"]
    assert p["hours_total"] == pytest.approx(total / node / 3600)
    assert p["cache_bytes_float16"] == tokens * 4096 * 2
    assert p["sae_train_memory_bytes"] == 4 * 2 * 4096 * 131072 * 4
    assert set(p["formula"]) >= {"tokens", "forward_flops", "sae_train_flops", "hours", "cache_bytes"}


def test_the_reference_run_on_paper():
    p = projection()
    assert p["tokens"] == 779_289 * (2_880 + 300)
    assert 1 < p["hours_total"] < 10  # hours, not days, on one 8-GPU node
    assert p["forward_flops"] > 5 * p["sae_train_flops"]  # the model's forward dominates
    assert 15e12 < p["cache_bytes_float16"] < 25e12  # ~20 TB if the activations were cached


def test_memory_guard_refuses_before_allocating():
    assert predicted_train_peak_gb(4096, 131072, 512) == pytest.approx(4 * 2 * 4096 * 131072 * 4 / 1e9 + 0.54 + 0.6,
                                                                      rel=0.01)
    assert predicted_train_peak_gb(4096, 131072, 512, 4096) == pytest.approx(
        predicted_train_peak_gb(4096, 131072, 512) + 2 * 4096 * 4096 * 4 / 1e9)
    with pytest.raises(MemoryError, match=r"needs about 99.0 GB .* more than the"):
        _check_memory(BenchScaleConfig(memory_limit_gb=20.0), 99.0, "this")
    _check_memory(BenchScaleConfig(memory_limit_gb=20.0), 0.1, "this")


@pytest.mark.slow
def test_every_stage_on_a_small_model(tmp_path):
    cfg = BenchScaleConfig(run=str(tmp_path / "run"), images=6, shard_images=2, hidden_size=128, d_sae=1024, k=8,
                           train_steps=2, train_batch=128, stats_rows=512, explain_features=2, steer_tokens=2, json=True)
    r = bench_scale(cfg)
    assert r["unfinished"] is None and r["peak_under_limit"]
    s = r["stages"]
    assert list(s) == ["model", "cache", "shard", "train", "features", "explain", "app", "steer"]
    for stage in s.values():
        assert stage["seconds"] > 0 and stage["peak_rss_gb"] > 0 and stage["bytes_on_disk"] >= 0
    # LLaVA-NeXT-8B's geometry: a square 672 px image is 576 + 2,304 patch tokens and 48 newlines
    assert s["cache"]["patch_rows_per_image"] == 2880 and s["cache"]["newline_tokens_per_image"] == 48
    assert s["cache"]["rows"] == 6 * 2880 and s["shard"]["shards"] == 3
    assert len(s["train"]["steps"]) == 2 and all(math.isfinite(x["fvu"]) for x in s["train"]["steps"])
    assert s["features"]["rows"] == 2 * 2880 and s["features"]["row_stats"]
    assert s["explain"]["explained"] == 2 and not s["explain"]["failed"]
    assert not s["app"]["errors"] and s["app"]["shown"]["feature_list_warm_s"]["titles"] == ["Feature list"]
    f = s["app"]["features"][1]
    assert s["app"]["shown"]["feature_page_warm_s"]["titles"][0].startswith(f"Feature {f}")
    assert isinstance(s["steer"]["baseline"], str)
    saved = json.loads((tmp_path / "run" / "bench-scale" / "report.json").read_text())
    assert saved["stages"]["steer"]["stage"] == "steer"
    # a finished stage is not run again
    again = bench_scale(cfg)
    assert again["stages"]["cache"]["seconds"] == s["cache"]["seconds"]
