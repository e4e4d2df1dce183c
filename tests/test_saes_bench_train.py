"""interp bench train (fair): the adapters train as their libraries do, evaluation matches what each saves."""

import pytest
import torch

from saes.bench_train import (BenchTrainFairConfig, _SaeLens, _Sparsify, _time_to, bench_train_fair, common_target,
                              parse_size)
from saes.data import TensorSource, synthetic_activations


def test_time_to_target_interpolates():
    curve = [(0, 1.0, 1.0), (10, 3.0, 0.5), (20, 5.0, 0.3)]
    assert _time_to(curve, 0.4) == 4.0
    assert _time_to(curve, 1.0) == 1.0
    assert _time_to(curve, 0.2) is None


def test_common_target_is_not_reached_by_initialisation():
    def run(start, final):
        return {"fvu": final, "curve": [(0, 0.0, start), (10, 1.0, final)]}

    best = {"ours": run(0.5, 0.2), "sparsify": run(0.7, 0.45), "sae-lens": run(1.0, 0.8)}
    assert common_target(best) == 0.45  # sae-lens ends above ours' start: it would be "reached" at step 0
    assert common_target({"a": run(0.5, 0.6), "b": run(0.7, 0.65)}) == 0.6  # nobody beats the best start


def test_bad_config_and_sizes():
    with pytest.raises(ValueError, match="D_IN:D_SAE:K:BATCH"):
        parse_size("512:8192:32")
    with pytest.raises(ValueError, match="k=64 is larger than d_sae=32"):
        parse_size("8:32:64:16")
    with pytest.raises(ValueError, match="must include ours"):
        BenchTrainFairConfig(trainers=("sparsify",))
    with pytest.raises(ValueError, match="positive multipliers"):
        BenchTrainFairConfig(lr_grid=(0.0,))
    with pytest.raises(ValueError, match="steps 0 runs only the sweep"):
        BenchTrainFairConfig(steps=0)


@pytest.fixture(scope="module")
def data():
    x = synthetic_activations(4096, 32, n_features=128, active=4, seed=0)
    return TensorSource(x[:3072]), x[3072:]


def test_sparsify_adapter_learns_and_evaluates_at_the_schedule_free_average(data):
    source, held_out = data
    run = _Sparsify(32, 256, 4, 256, 10, source, 0, 1.0)
    fvu0 = float(((run.reconstruct(held_out) - held_out) ** 2).sum() / ((held_out - held_out.mean(0)) ** 2).sum())
    for i, batch in enumerate(source.batches(256, seed=0)):
        if i == 10:
            break
        run.step(batch)
    y = run.reconstruct(held_out)
    fvu = float(((y - held_out) ** 2).sum() / ((held_out - held_out.mean(0)) ** 2).sum())
    assert fvu < 0.8 * fvu0
    # reconstruct switched to the averaged weights and back: the training weights come back (to rounding)
    # and the averaged ones differ from them
    w = run.coder.W_dec.detach().clone()
    run.opt.eval()
    averaged = run.coder.W_dec.detach().clone()
    run.opt.train()
    run.reconstruct(held_out)
    torch.testing.assert_close(run.coder.W_dec.detach(), w, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(averaged, w)


def test_sae_lens_adapter_evaluates_what_sae_lens_saves(data):
    import copy

    source, held_out = data
    run = _SaeLens(32, 256, 4, 256, 4, source, 0, 1.0)
    for i, batch in enumerate(source.batches(256, seed=0)):
        if i == 4:
            break
        run.step(batch)
    folded = copy.deepcopy(run.sae)
    folded.fold_activation_norm_scaling_factor(run.scale)  # what SAETrainer.fit() does before saving
    folded.eval()
    with torch.no_grad():
        torch.testing.assert_close(run.reconstruct(held_out), folded(held_out), rtol=1e-4, atol=1e-4)
    assert run.scale == pytest.approx(32 ** 0.5 / float(source.data.norm(dim=1).mean()), rel=0.05)


def test_bench_train_small_report():
    cfg = BenchTrainFairConfig(d_in=32, d_sae=256, k=4, batch_size=256, steps=6, eval_every=3, eval_rows=512,
                               true_features=128, active=4, lr_grid=(0.5, 1.0), sweep=("32:256:8:128",),
                               sweep_steps=2)
    report = bench_train_fair(cfg)
    assert [g["lr_multiplier"] for g in report["grid"]] == [0.5, 1.0]
    best = report["best"]
    assert set(best) == {"ours", "sparsify", "sae-lens"}
    start = min(g["results"][n]["curve"][0][2] for g in report["grid"] for n in best)
    finals = [b["fvu"] for b in best.values() if b["fvu"] < start]
    assert report["target_fvu"] == (max(finals) if finals else min(b["fvu"] for b in best.values()))
    for name, b in best.items():  # reached exactly by those that end at or below it
        assert (report["seconds_to_target_fvu"][name] is not None) == (b["fvu"] <= report["target_fvu"])
    assert {"speed_ours_over_sparsify", "speed_ours_over_sae_lens"} <= set(report["ratios"])
    assert report["sweep"][0]["size"] == "32:256:8:128" and report["sweep"][0]["speed_ours_over_sparsify"] > 0
    curve = report["grid"][1]["results"]["ours"]["curve"]
    assert [c[0] for c in curve] == [0, 3, 6]
