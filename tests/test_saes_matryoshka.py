"""Matryoshka BatchTopK: nested prefixes that reconstruct on their own, its SAELens mapping, its bad settings."""

import json
import warnings

import pytest
import torch

from saes.architectures.matryoshka import default_widths
from saes.data import TensorSource, synthetic_activations
from saes.sae import SAE, SAEConfig
from saes.train import TrainConfig, train

D_IN, D_SAE = 32, 256


@pytest.fixture(scope="module")
def data():
    return synthetic_activations(24_000, D_IN, n_features=128, active=4, seed=0)


def prefix_fvu(sae: SAE, x: torch.Tensor, width: int) -> float:
    """FVU of the reconstruction from the first `width` features alone."""
    with torch.no_grad():
        acts = sae.encode(x)
        acts[:, width:] = 0
        return float(((sae.decode(acts) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def quick(arch, data, tmp_path, **kw):
    cfg = TrainConfig(steps=300, batch_size=256, lr=3e-3, warmup_steps=20, log_every=50, checkpoint_every=1000,
                      dead_window=50, progress=False, device="cpu", **kw)
    return train(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=8), cfg, TensorSource(data[:20_000]), tmp_path / arch)


def test_prefixes_reconstruct_on_their_own_where_batchtopk_prefixes_do_not(data, tmp_path):
    held_out = data[20_000:]
    mat = quick("matryoshka", data, tmp_path).sae
    flat = quick("batchtopk", data, tmp_path).sae
    assert default_widths(D_SAE) == (32, 64, 128, 256)
    full_m, full_b = prefix_fvu(mat, held_out, D_SAE), prefix_fvu(flat, held_out, D_SAE)
    assert full_m < 0.3 and full_b < 0.3
    first_m, first_b = prefix_fvu(mat, held_out, 32), prefix_fvu(flat, held_out, 32)
    # a BatchTopK dictionary's first 32 features are an arbitrary eighth of it; Matryoshka's were trained to
    # reconstruct alone
    assert first_m < 0.75 * first_b, (first_m, first_b)
    # frequent features live in the early prefix
    with torch.no_grad():
        density = (mat.encode(held_out) > 0).float().mean(0)
    assert density[:32].mean() > 2 * density[128:].mean()


def test_inner_prefixes_add_to_the_loss():
    torch.manual_seed(0)
    x = torch.randn(128, 32)
    losses = {}
    for arch in ("matryoshka", "batchtopk"):
        sae = SAE(SAEConfig(arch=arch, d_in=32, d_sae=256, k=6), generator=torch.Generator().manual_seed(0))
        losses[arch] = sae.training_forward(x, None)
    m, b = losses["matryoshka"], losses["batchtopk"]
    assert torch.equal(m.mse, b.mse)  # the same selection and full reconstruction
    assert float(m.loss.detach()) > 1.5 * float(b.loss.detach())  # plus three inner levels, each worse than the full one


def test_saved_with_its_widths_and_loaded_back_by_sae_lens_and_ours(tmp_path):
    sae = SAE(SAEConfig(arch="matryoshka", d_in=16, d_sae=64, k=4, matryoshka_widths=(8, 24, 64)),
              generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.uniform_(0, 0.2)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["training_architecture_details"] == {"k": 4, "matryoshka_widths": [8, 24, 64]}
    ours = SAE.load(tmp_path)
    assert ours.cfg.arch == "matryoshka" and ours.cfg.matryoshka_widths == (8, 24, 64)
    x = torch.randn(30, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sae_lens
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert torch.equal(theirs.encode(x), ours.encode(x))
    # without our own config in the metadata the widths come from sae-lens's training details
    meta = cfg["metadata"]
    del meta["lmmscope"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    again = SAE.load(tmp_path)
    assert again.cfg.arch == "matryoshka" and again.cfg.matryoshka_widths == (8, 24, 64) and again.cfg.k == 4
    assert torch.equal(again.encode(x), ours.encode(x))


def test_sae_lens_matryoshka_training_format_loads(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
        from sae_lens import SAE as SaeLensSAE

        torch.manual_seed(0)
        sl = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=16, d_sae=64, k=4, matryoshka_widths=[16, 32, 64]))
        with torch.no_grad():
            for p in sl.parameters():
                p.normal_(0, 0.3)
            sl.topk_threshold.fill_(0.2)
        sl.save_model(tmp_path / "train")
        sl.save_inference_model(tmp_path / "inference")
        inference = SaeLensSAE.load_from_disk(tmp_path / "inference")
    x = torch.randn(40, 16)
    for sub in ("train", "inference"):
        ours = SAE.load(tmp_path / sub)
        assert ours.cfg.arch == "matryoshka" and ours.cfg.matryoshka_widths == (16, 32, 64), sub
        a = ours.encode(x)
        assert torch.equal(a > 0, inference.encode(x) > 0), sub
        torch.testing.assert_close(a, inference.encode(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("widths", [(32, 16, 64), (16, 32), (0, 64), (16, 64, 64)])
def test_bad_widths_name_the_rule(widths):
    with pytest.raises(ValueError, match=r"matryoshka widths must be positive, strictly increasing and end at "
                                         r"d_sae=64, got .*\(e\.g\. 8 16 32 64\)"):
        SAEConfig(arch="matryoshka", d_sae=64, k=4, matryoshka_widths=widths)
