"""interp bench steer: every variant generates the same number of tokens; engines agree; ratios for each."""

import pytest

from steering.bench import BenchSteerConfig, bench_steer


@pytest.fixture(scope="module")
def subject_path(tmp_path_factory):
    """A random-init shapes-subject v2 (8 LLM layers): the bench's cost does not depend on trained weights."""
    from interp.shapes.organisms.build import SPECS, build_model, build_processor

    path = tmp_path_factory.mktemp("subject-v2") / "model"
    build_model(SPECS["subject"], seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


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
