"""End to end on the shapes world: an SAE of shapes-subject at its middle layer (4 of 8), trained here, then
`interp steer-targets` with that SAE at its own layer (no twin SAE at another layer): its colour and shape
features must steer "what color is the <shape> ?" and "what shape is the <colour> object ?"."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    """A layer-4 cache of the shipped subject (1500 samples), an SAE of the demo's recipe (`demo_sae_config`),
    its features and recovery, then `interp steer-targets` at the stage's sizes (~4 minutes on 2 cores in all)."""
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.writer import CacheConfig, build_cache
    from interp.shapes.organisms import organism_path
    from saes.recovery import RecoveryConfig, run_recovery
    from interp.pipeline.demo import demo_sae_config
    from saes.train import TrainConfig, TrainRunConfig, run_train
    from steering.commands import TargetsConfig, run_targets

    layers = json.loads((organism_path("shapes-subject") / "config.json").read_text())["text_config"]["num_hidden_layers"]
    if layers < 8:
        pytest.skip(f"the shipped shapes-subject has {layers} LLM layers: these tests are for subject v2 (8)")
    run = tmp_path_factory.mktemp("steered") / "run"
    build_cache(CacheConfig(run=str(run), layer="4", samples=1500))
    run_train(TrainRunConfig(run=str(run), sae=demo_sae_config(),
                             train=TrainConfig(steps=3000, batch_size=1024, progress=False)))
    compute_features(FeaturesConfig(run=str(run), progress=False))
    run_recovery(RecoveryConfig(run=str(run)))
    return run, run_targets(TargetsConfig(run=str(run), select_questions=30, eval_questions=80,
                                          attribution_questions=40, progress=False))


@pytest.mark.slow
def test_colour_features_steer_at_the_saes_own_layer(steered):
    run, r = steered
    assert r == json.loads((run / "steering_summary.json").read_text())
    assert r["sae_layer"] == r["steering_layer"] == 4 and r["positions"] == ["image", "all"]
    assert r["reach"]["answers_changed"] > 0.5
    # how often it flips the answer is issue 12's target, the test below
    for method in ("patching", "integrated_gradients_4"):  # the attribution predicts what ablations do
        assert r["attribution"]["color"][method]["spearman_per_image_mean"] > 0.5, r["attribution"]["color"]
    assert (run / "steering" / "select-color-image" / "sweep.html").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["color", "shape"])
def test_features_meet_the_issue_steering_target(steered, kind):
    _, r = steered
    assert r["flip"][kind]["overall"] >= 0.8, r["flip"][kind]


@pytest.mark.slow
def test_sweep_kill_9_at_a_random_point_then_resume_equals_uninterrupted(tmp_path):
    """A real SIGKILL of `interp sweep` part-way, then the same command: every generation
    is recorded exactly once and the summary equals an uninterrupted run's."""
    import json
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from saes.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=128, d_sae=32, k=4, model_name="shapes-subject",
                        hook_name="model.language_model.layers.0"))
    for run in ("straight", "killed"):
        sae.save(tmp_path / run / "sae")
    spec = {"features": [1, 2, 3], "strengths": [0.0, 200.0, 600.0], "mode": "add",
            "unit": "absolute", "positions": "image", "world": {"task": "color", "n": 24, "split": "val"},
            "max_new_tokens": 3, "batch_size": 4, "engine": "torch"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = lambda run: [sys.executable, "-m", "interp.cli", "sweep", str(run), "--spec",  # noqa: E731
                       str(tmp_path / "spec.yaml"), "--no-progress"]
    subprocess.run(cmd(tmp_path / "straight"), check=True, env=env, capture_output=True)
    records = tmp_path / "killed" / "steering" / "spec" / "generations.jsonl"
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.randint(5, 150)  # of 24 baseline + 3 x 3 x 24 generations
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or records.read_text().count("\n") < kill_after):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "steering" / "spec" / "summary.json").exists(), "the kill came too late"
    subprocess.run(cmd(tmp_path / "killed"), check=True, env=env, capture_output=True)

    def keyed(path):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {json.dumps({k: v for k, v in r.items() if k in ("feature", "strength", "prompt", "image", "key")},
                           sort_keys=True): r.get("answer", r.get("output")) for r in rows if "header" not in r}

    a, b = keyed(tmp_path / "straight" / "steering" / "spec" / "generations.jsonl"), keyed(records)
    assert a == b and len(b) == records.read_text().count("\n") - (1 if '"header"' in records.read_text() else 0)
    sa = json.loads((tmp_path / "straight" / "steering" / "spec" / "summary.json").read_text())
    sb = json.loads((tmp_path / "killed" / "steering" / "spec" / "summary.json").read_text())
    assert sa == sb
