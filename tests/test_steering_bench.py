"""interp bench steer: every variant generates the same number of tokens; engines agree; ratios for each."""


from steering.bench import BenchSteerConfig, bench_steer


def test_bench_steer_small(subject_path):
    cfg = BenchSteerConfig(model=str(subject_path), batch_size=2, max_new_tokens=3, rounds=1, positions=("all", "image"))
    report = bench_steer(cfg)
    results = report["results"]
    variants = ["baseline", "nnsight@all", "torch@all", "nnsight@image", "torch@image"]
    assert all(results[v]["new_tokens"] == 3 for v in variants)  # min_new_tokens: the same work in every run
    assert results["engines_agree"] is True
    ratios = report["ratios"]
    assert ratios["steer_over_generate"] == max(ratios["steer_over_generate_nnsight"], ratios["steer_over_generate_torch"])
    assert ratios["steer_over_generate_torch"] == max(ratios["steer_over_generate_torch@all"],
                                                      ratios["steer_over_generate_torch@image"])
    assert report["sae"]["layer"] == "layers.4" and report["interventions"]["all"]["mode"] == "clamp"
