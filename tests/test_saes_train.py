"""SAE training: every architecture learns, resumes exactly, fails clearly, and runs data-parallel."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from saes.data import TensorSource, synthetic_activations
from saes.sae import SAE, SAEConfig
from saes.train import TrainConfig, Trainer, rank_batches, train, train_steps_per_second, zca_whitening

D_IN, D_SAE = 32, 256
ARCH_KW = {"topk": {"k": 8}, "batchtopk": {"k": 8}, "matryoshka": {"k": 8}, "jumprelu": {}, "relu": {}}


@pytest.fixture(scope="module")
def data():
    return synthetic_activations(24_000, D_IN, n_features=128, active=4, seed=0)


def fvu(model, x):
    with torch.no_grad():
        return float(((model(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def quick_cfg(**kw):
    base = dict(steps=300, batch_size=256, lr=3e-3, warmup_steps=20, log_every=25, checkpoint_every=1000,
                dead_window=50, progress=False, device="cpu")  # bit-exact resume is a CPU guarantee
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"])
def test_each_arch_learns_and_saves_in_sae_lens_format(arch, data, tmp_path):
    train_rows, held_out = data[:20_000], data[20_000:]
    result = train(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, **ARCH_KW[arch]), quick_cfg(), TensorSource(train_rows),
                   tmp_path)
    score = fvu(result.sae, held_out)
    assert score < 0.3, f"{arch}: held-out FVU {score:.3f}"
    l0 = (result.sae.encode(held_out) > 0).float().sum(1).mean().item()
    assert 1 <= l0 <= 64, f"{arch}: L0 {l0}"
    # the saved SAE works on raw activations, in sae_lens, with the same outputs bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sae_lens import SAE as SaeLensSAE
    theirs = SaeLensSAE.load_from_disk(result.path)
    assert torch.equal(theirs.encode(held_out), result.sae.encode(held_out))
    assert torch.equal(theirs(held_out), result.sae(held_out))
    assert torch.equal(SAE.load(result.path)(held_out), result.sae(held_out))
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 300 and {"fvu", "l0", "dead_frac", "loss", "lr"} <= set(records[-1])
    run = json.loads((tmp_path / "train_run.json").read_text())
    assert run["run"]["sae"]["arch"] == arch and "versions" in run
    assert (tmp_path / "sae" / "sparsity.safetensors").exists()


def _state(trainer: Trainer):
    sd = {k: v.clone() for k, v in trainer.sae.state_dict().items()}
    opt = trainer.opt.state_dict()["state"]
    for i, st in opt.items():
        for k, v in st.items():
            sd[f"opt.{i}.{k}"] = v.clone()
    sd["dead"] = trainer.steps_since_fired.clone()
    return sd


@pytest.mark.parametrize("arch,whiten", [("topk", 0), ("batchtopk", 0), ("matryoshka", 0),
                                         ("jumprelu", 0), ("batchtopk", 0.01)])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(arch, whiten, data, tmp_path):
    src = TensorSource(data[:3000])  # 11 batches per epoch: the run crosses epochs
    sae_cfg = SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, whiten=whiten, **ARCH_KW[arch])
    cfg = quick_cfg(steps=40, checkpoint_every=5, dead_window=4, log_every=3)  # AuxK on from step 4
    straight = Trainer(sae_cfg, cfg, src, tmp_path / "a")
    straight.fit()
    first = Trainer(sae_cfg, cfg, src, tmp_path / "b")
    first.fit(stop_at=17)
    assert first.step == 17 and not (tmp_path / "b" / "sae").exists()
    resumed = Trainer(sae_cfg, cfg, src, tmp_path / "b")
    assert resumed.step == 17
    resumed.fit()
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    assert a["norm_whiten"].numel() == (D_IN * D_IN if whiten else 0)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "step_s")}  # noqa: E731
                       for line in p.read_text().splitlines()]
    assert strip(tmp_path / "a" / "train" / "metrics.jsonl") == strip(tmp_path / "b" / "train" / "metrics.jsonl")


def test_resume_with_another_config_is_refused(data, tmp_path):
    src = TensorSource(data[:4000])
    sae_cfg = SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8)
    train(sae_cfg, quick_cfg(steps=6), src, tmp_path, stop_at=3)
    with pytest.raises(ValueError, match=r"checkpoint .* was made with other settings \(train.lr: recorded 0\.003, "
                                         r"now 0\.001\): use another run directory or delete the checkpoint"):
        Trainer(sae_cfg, quick_cfg(steps=6, lr=1e-3), src, tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(sae\.k: recorded 8, now 4\)"):
        Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=4), quick_cfg(steps=6), src, tmp_path)
    Trainer(sae_cfg, quick_cfg(steps=6, checkpoint_every=2, log_every=1), src, tmp_path)  # bookkeeping may change


def test_whitening_gives_unit_variance_where_the_data_varies_and_spares_the_noise():
    g = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(2, -4, D_IN)  # variances from 100 down to 1e-4
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))
    x = torch.randn(50_000, D_IN, generator=g) * spectrum.sqrt() @ q.T
    p = zca_whitening(x - x.mean(0), 0.01)
    torch.testing.assert_close(p, p.T)
    var = ((x - x.mean(0)) @ p @ q).var(0)  # variance along each of the data's own axes, after whitening
    expected = spectrum / (spectrum + 0.01 * spectrum[0])
    torch.testing.assert_close(var, expected, rtol=0.05, atol=1e-3)
    assert var[:8].min() > 0.5 and var[-8:].max() < 0.01  # strong directions equalised, noise not amplified
    with pytest.raises(ValueError, match="ridge of the whitening.*got -0.1; 0 for no whitening"):
        SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8, whiten=-0.1)
    with pytest.raises(ValueError, match="whiten needs normalize"):
        SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8, whiten=0.01, normalize=False)


class _Batches:
    """A BatchSource with a NaN and an Inf planted in one batch."""

    def __init__(self, bad_batch):
        self.d, self.n_rows, self.bad = D_IN, 64 * 50, bad_batch

    def batches(self, batch_size, *, seed=0, start_batch=0):
        for b in range(start_batch, self.n_rows // batch_size):
            x = torch.randn(batch_size, self.d, generator=torch.Generator().manual_seed(seed * 1000 + b))
            if b == self.bad:
                x[5, 3], x[9, 0] = float("nan"), float("inf")
            yield x

    def stats(self):
        return {"mean": torch.zeros(self.d), "norm": 1.0}


def test_errors_name_the_problem(data, tmp_path):
    cfg = quick_cfg(steps=20, batch_size=64, stats_rows=64)
    with pytest.raises(ValueError, match=r"width d=32, but the SAE expects d_in=48"):
        Trainer(SAEConfig(arch="topk", d_in=48, d_sae=D_SAE, k=8), cfg, TensorSource(data[:1000]), None)
    with pytest.raises(ValueError, match=r"the activation source is empty \(n_rows=0\): nothing to train on"):
        Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8), cfg, TensorSource(torch.empty(0, D_IN)), None)
    with pytest.raises(ValueError, match="the activation source has 10 rows, fewer than one batch of 64"):
        Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8), cfg, TensorSource(data[:10]), None)
    trainer = Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8), cfg, _Batches(bad_batch=7), None)
    with pytest.raises(ValueError, match=r"batch 7 \(step 7\): NaN or Inf in rows 5, 9"):
        trainer.fit()
    with pytest.raises(ValueError, match=r"statistics sample batch 0: NaN or Inf in rows 5, 9"):
        Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8), cfg, _Batches(bad_batch=0), None)


class _Ranked(TensorSource):  # takes rank / world_size: each rank reads only its batches
    pass


class _Plain:  # an endless stream without rank / world_size: ranks skip the others' batches
    def __init__(self, t):
        self.inner, self.d, self.n_rows = TensorSource(t), t.shape[1], t.shape[0]

    def batches(self, batch_size, *, seed=0, start_batch=0):
        return self.inner.batches(batch_size, seed=seed, start_batch=start_batch)


class _OneEpoch(_Plain):  # a stream that ends after one epoch
    def batches(self, batch_size, *, seed=0, start_batch=0):
        for b in range(start_batch, self.n_rows // batch_size):
            yield self.inner.data[b * batch_size:(b + 1) * batch_size] + seed


@pytest.mark.parametrize("source_cls", [_Ranked, _Plain, _OneEpoch])
def test_ranks_read_disjoint_shares_of_the_same_stream(source_cls):
    t = torch.arange(70.0)[:, None].repeat(1, 2)  # 7 batches of 10 per epoch
    src = source_cls(t)
    take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    single = take(rank_batches(src, 10, seed=3), 16)
    assert len({b[0, 0].item() for _, b in single[:7]}) == 7  # the first epoch covers distinct rows
    r0 = take(rank_batches(src, 10, seed=3, rank=0, world=2), 8)
    r1 = take(rank_batches(src, 10, seed=3, rank=1, world=2), 8)
    merged = sorted(r0 + r1, key=lambda gb: gb[0])
    assert [g for g, _ in merged] == list(range(16))
    for (g1, b1), (g2, b2) in zip(single, merged):
        assert g1 == g2 and torch.equal(b1, b2)
    resumed = take(rank_batches(src, 10, seed=3, start_step=4, rank=1, world=2), 3)
    assert [g for g, _ in resumed] == [9, 11, 13]
    for (_, a), (_, b) in zip(resumed, r1[4:7]):
        assert torch.equal(a, b)


def test_a_stream_that_ends_too_early_is_an_error():
    class Short(_Plain):  # promises 5 batches per epoch, yields 3
        def batches(self, batch_size, *, seed=0, start_batch=0):
            for b in range(start_batch, 3):
                yield self.inner.data[b * batch_size:(b + 1) * batch_size]

    stream = rank_batches(Short(torch.zeros(50, 2)), 10, seed=0)
    for _ in range(3):
        next(stream)
    with pytest.raises(ValueError, match="ended early, at global batch 3"):
        next(stream)


def test_train_steps_per_second(data):
    rate = train_steps_per_second(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=8),
                                  TrainConfig(batch_size=256, device="cpu"), TensorSource(data), steps=3)
    assert 0 < rate < 1e6


def test_train_stage_reads_a_safetensors_tensor_in_the_run(data, tmp_path):
    from safetensors.torch import save_file

    from saes.train import TrainRunConfig, run_train

    save_file({"activations": data[:5000]}, tmp_path / "activations.safetensors")
    result = run_train(TrainRunConfig(run=str(tmp_path), sae=SAEConfig(arch="batchtopk", d_sae=128, k=4,
                                                                       hook_name="blocks.2.hook_resid_post"),
                                      train=quick_cfg(steps=60, warmup_steps=5)))
    assert result.path == tmp_path / "sae"
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["training_architecture"] == "batchtopk" and cfg["d_in"] == D_IN
    with pytest.raises(FileNotFoundError, match=r"no activation cache at .*x/activations.h5: make one with "
                                                r"`interp cache"):
        run_train(TrainRunConfig(run=str(tmp_path / "x")))


def test_train_stage_on_an_activation_cache_linked_into_the_run(tiny_path, tmp_path):
    """The real path: `interp cache` output read by interp.cache.reader.ActivationReader, here a cache made in
    another run and symlinked into this one."""
    from interp.cache.reader import ActivationReader
    from interp.cache.writer import CacheConfig, build_cache
    from interp.infra.layout import RunLayout
    from saes.train import TrainRunConfig, run_train

    cache = build_cache(CacheConfig(run=str(tmp_path / "made"), model=str(tiny_path("llava")), layer="0", samples=40,
                                    batch_size=8, dtype="float32"))
    RunLayout(tmp_path / "run").link("cache", cache)
    run_train(TrainRunConfig(run=str(tmp_path / "run"), sae=SAEConfig(d_sae=64, k=4),
                             train=quick_cfg(steps=40, batch_size=64, warmup_steps=5)))
    cfg = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["metadata"]["hook_layer"] == 0
    assert cfg["metadata"]["model_name"].endswith("llava") and cfg["metadata"]["cache_site"] == "resid"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sae_lens import SAE as SaeLensSAE

    x = ActivationReader(cache).read(0, 200)
    theirs, ours = SaeLensSAE.load_from_disk(tmp_path / "run" / "sae"), SAE.load(tmp_path / "run" / "sae")
    assert torch.equal(theirs.encode(x), ours.encode(x)) and fvu(ours, x) < 1.0


def test_bench_reports_all_three_and_the_ratios():
    from saes.bench import BenchTrainConfig, bench_train

    report = bench_train(BenchTrainConfig(d_in=32, d_sae=256, k=8, batch_size=256, steps=6, true_features=64, active=4,
                                          eval_rows=512, json=True))
    assert set(report["results"]) == {"ours", "dense", "sae_lens"}
    for r in report["results"].values():
        assert r["acts_per_s"] > 0 and 0 <= r["fvu"] < 2
    assert report["results"]["ours"]["fvu"] == pytest.approx(report["results"]["dense"]["fvu"], abs=1e-3)
    assert {"speed_ours_over_sae_lens", "speed_ours_over_dense", "ours_step_over_matmul"} <= set(report["ratios"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return os.environ | {"OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


@pytest.mark.slow
def test_torchrun_two_processes_train_a_valid_sae(data, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "ddp"
    out.mkdir()
    save_file({"activations": data[:20_000]}, out / "activations.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "interp.cli", "train", str(out),
           "--arch", "topk", "--d-sae", str(D_SAE), "--k", "8",
           "--steps", "300", "--batch-size", "256", "--lr", "3e-3", "--warmup-steps", "20", "--dead-window", "50",
           "--threads", "1", "--device", "cpu", "--no-progress", "--checkpoint-every", "100"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "train_run.json").read_text())
    assert run["run"]["world_size"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sae_lens import SAE as SaeLensSAE
    theirs = SaeLensSAE.load_from_disk(out / "sae")
    held_out = data[20_000:]
    assert fvu(theirs, held_out) < 0.3
    assert torch.equal(theirs.encode(held_out), SAE.load(out / "sae").encode(held_out))


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    from safetensors.torch import load_file, save_file

    for run in ("straight", "killed"):
        (tmp_path / run).mkdir()
        save_file({"activations": data[:20_000]}, tmp_path / run / "activations.safetensors")

    def cmd(run):
        return [sys.executable, "-m", "interp.cli", "train", str(run),
                "--d-sae", "1024", "--k", "8", "--steps", "400", "--batch-size", "512", "--lr", "3e-3",
                "--dead-window", "20", "--threads", "1", "--no-progress",
                "--checkpoint-every", "25", "--log-every", "5", "--device", "cpu"]

    subprocess.run(cmd(tmp_path / "straight"), env=_env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "train" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it somewhere between checkpoints, after the first one
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "sae").exists(), "the run finished before it could be killed"
    subprocess.run(cmd(tmp_path / "killed"), env=_env(), check=True, capture_output=True, timeout=600)
    a = load_file(tmp_path / "straight" / "sae" / "sae_weights.safetensors")
    b = load_file(tmp_path / "killed" / "sae" / "sae_weights.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
