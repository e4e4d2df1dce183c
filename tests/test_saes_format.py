"""SAELens on-disk compatibility: what we save loads in sae_lens, what sae_lens saves loads in ours."""

import json
import warnings

import pytest
import torch

from saes.sae import SAE, SAEConfig

ARCHS = ["topk", "batchtopk", "matryoshka", "jumprelu", "relu"]
EXPECTED_SAE_LENS_CLASS = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "matryoshka": "JumpReLUSAE",
                           "jumprelu": "JumpReLUSAE", "relu": "StandardSAE"}


def random_sae(arch: str, d_in=32, d_sae=128, normalised=True, seed=0, whitened=False,
               apply_b_dec_to_input=True) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=8, model_name="tiny", hook_name="blocks.1.hook",
                        hook_layer=1, whiten=0.01 if whitened else 0,
                        apply_b_dec_to_input=apply_b_dec_to_input), generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.3 * torch.rand(d_sae, generator=g))
    if normalised:
        whiten = None
        if whitened:  # a symmetric positive definite matrix, far from a multiple of the identity
            a = torch.randn(d_in, d_in, generator=g)
            whiten = a @ a.T / d_in + 0.2 * torch.eye(d_in)
        sae.set_normalisation(torch.randn(d_in, generator=g), 3.7, whiten)
    sae.use_training_layout()
    return sae


@pytest.fixture(scope="module")
def sae_lens_api():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sae_lens
        import sae_lens.saes as saes_mod
    return sae_lens, saes_mod


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_sae_loads_in_sae_lens_with_identical_outputs(arch, tmp_path, sae_lens_api):
    sae_lens, _ = sae_lens_api
    sae = random_sae(arch)
    x = 4 * torch.randn(64, 32)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_version"] and cfg["metadata"]["hook_name"] == "blocks.1.hook"
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == EXPECTED_SAE_LENS_CLASS[arch]
    ours = SAE.load(tmp_path)
    assert ours.cfg.arch == arch
    a_theirs, a_ours = theirs.encode(x), ours.encode(x)
    assert torch.equal(a_ours, a_theirs)
    assert torch.equal(ours.decode(a_ours), theirs.decode(a_theirs))
    assert torch.equal(ours(x), theirs(x))
    # the in-memory SAE (normalisation not folded) computes the same function
    a_mem = sae.encode(x)
    assert torch.equal(a_mem > 0, a_theirs > 0)
    torch.testing.assert_close(a_mem, a_theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae(x), theirs(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("whitened,apply_b_dec", [(False, True), (True, True), (True, False)])
def test_folding_normalisation_keeps_the_function(whitened, apply_b_dec):
    for arch in ARCHS:
        sae = random_sae(arch, seed=3, whitened=whitened, apply_b_dec_to_input=apply_b_dec)
        x = 5 * torch.randn(50, 32) + 2
        before_a, before_x = sae.encode(x), sae(x)
        before_pre = sae.raw_pre_acts(x)
        assert sae.is_normalised()
        torch.testing.assert_close(sae.activate_raw(before_pre), before_a, atol=1e-5, rtol=1e-5)
        sae.fold_normalisation()
        assert not sae.is_normalised()
        torch.testing.assert_close(sae.encode(x), before_a, atol=1e-4, rtol=1e-4)
        # pre-activations, the units interventions edit, are in raw units either way
        torch.testing.assert_close(sae.raw_pre_acts(x), before_pre, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(sae.activate_raw(sae.raw_pre_acts(x)), sae.encode(x))
        torch.testing.assert_close(sae(x), before_x, atol=1e-4, rtol=1e-4)
        assert sae.norm_whiten.numel() == 0  # nothing of the normalisation is left to apply


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_whitened_sae_saves_and_loads_in_sae_lens_with_identical_outputs(arch, tmp_path, sae_lens_api):
    sae_lens, _ = sae_lens_api
    sae = random_sae(arch, whitened=True)
    x = 4 * torch.randn(64, 32)
    sae.save(tmp_path)
    theirs, ours = sae_lens.SAE.load_from_disk(tmp_path), SAE.load(tmp_path)
    assert ours.cfg.whiten == 0.01 and not ours.is_normalised()
    assert torch.equal(ours.encode(x), theirs.encode(x))
    assert torch.equal(ours(x), theirs(x))
    torch.testing.assert_close(sae(x), theirs(x), atol=1e-4, rtol=1e-4)


def _randomise(sl):
    with torch.no_grad():
        for p in sl.parameters():
            p.normal_(0, 0.3)
        if hasattr(sl, "threshold"):
            sl.threshold.data.uniform_(0, 0.3)
        if hasattr(sl, "topk_threshold"):
            sl.topk_threshold.fill_(0.2)
    return sl


@pytest.mark.parametrize("name,exact", [("TopKSAE", True), ("JumpReLUSAE", True), ("StandardSAE", True),
                                        ("TopKTrainingSAE", False), ("BatchTopKTrainingSAE", False),
                                        ("JumpReLUTrainingSAE", True), ("StandardTrainingSAE", True)])
def test_sae_lens_saved_sae_loads_in_ours(name, exact, tmp_path, sae_lens_api):
    sae_lens, m = sae_lens_api
    torch.manual_seed(0)
    kw = {"k": 8} if "TopK" in name else {}
    sl = _randomise(getattr(m, name)(getattr(m, name + "Config")(d_in=32, d_sae=128, **kw)))
    sl.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    x = torch.randn(40, 32)
    if name == "BatchTopKTrainingSAE":  # its training encode is batch-level; compare with its inference form
        sl.save_inference_model(tmp_path / "inference")
        sl = sae_lens.SAE.load_from_disk(tmp_path / "inference")
        assert torch.equal(SAE.load(tmp_path / "inference").encode(x), sl.encode(x))
    a_theirs = sl.encode(x)
    a_ours = ours.encode(x)
    if exact:
        assert torch.equal(a_ours, a_theirs)
        assert torch.equal(ours.decode(a_ours), sl.decode(a_theirs))
    else:  # training formats keep unit-free decoder norms; we fold them on load (as sae-lens does on export)
        assert torch.equal(a_ours > 0, a_theirs > 0)
        torch.testing.assert_close(a_ours, a_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(a_ours), sl.decode(a_theirs), atol=1e-5, rtol=1e-5)


def test_wrong_input_width_names_both_widths():
    sae = random_sae("topk")
    with pytest.raises(ValueError, match=r"d_in=32.*width 48"):
        sae.encode(torch.randn(3, 48))
    with pytest.raises(ValueError, match=r"d_sae=128.*width 64"):
        sae.decode(torch.randn(3, 64))


def test_leading_dims_and_bad_configs():
    sae = random_sae("jumprelu")
    x = torch.randn(2, 5, 32)
    assert sae.encode(x).shape == (2, 5, 128) and sae(x).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="architecture"):
        SAEConfig(arch="gated")
    with pytest.raises(ValueError, match="integer k"):
        SAEConfig(arch="topk", k=2.5)


def test_unsupported_sae_lens_files_fail_clearly(tmp_path, sae_lens_api):
    _, m = sae_lens_api
    sl = _randomise(m.StandardSAE(m.StandardSAEConfig(d_in=8, d_sae=16, normalize_activations="layer_norm")))
    sl.save_model(tmp_path)
    with pytest.raises(ValueError, match="normalize_activations"):
        SAE.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SAE.load(tmp_path / "nothing")
