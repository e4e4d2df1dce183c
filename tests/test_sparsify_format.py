"""EleutherAI sparsify's SAE format: what sparsify saves loads in ours with its outputs, what we save loads in
sparsify's SparseCoder with ours, the multimodal-sae hookpoint layout, and bad folders named in one clear error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saes.sae import SAE, SAEConfig
from saes.sparsify_format import (FORMAT_SAELENS, FORMAT_SPARSIFY, FORMAT_SPARSIFY_RUN, SAELoadConfig,
                                  SparsifyFormatError, SparsifyLoadConfig, SparsifySaveConfig, detect_sae_format,
                                  hookpoint_folders, hookpoint_for_layer, layer_for_hookpoint, load_sae,
                                  load_sparsify, sae_weights_file, save_sparsify)

D_IN, LATENTS, K = 48, 384, 12


@pytest.fixture(scope="module")
def sparsify():
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # "Triton not installed, using eager implementation"
        import sparsify
    return sparsify


def random_coder(sparsify, seed=0, dtype=torch.float32):
    """A SparseCoder whose every tensor is random (its own init zeroes the biases and ties W_dec)."""
    torch.manual_seed(seed)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=LATENTS, k=K), dtype=dtype)
    with torch.no_grad():
        coder.encoder.weight.normal_(0, 0.2)
        coder.encoder.bias.normal_(0, 0.3)
        coder.W_dec.normal_().mul_(torch.rand(LATENTS, 1, dtype=dtype) + 0.5)  # not unit norm
        coder.b_dec.normal_(0, 2)
    return coder


def dense(top_acts, top_indices, width=LATENTS):
    return torch.zeros(top_acts.shape[0], width, dtype=top_acts.dtype).scatter_(1, top_indices, top_acts)


def inputs(n=257, seed=1):
    return 3 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) + 1


def test_sparsify_folder_loads_with_sparsify_outputs(sparsify, tmp_path):
    coder = random_coder(sparsify)
    coder.save_to_disk(tmp_path / "model.layers.24")
    assert detect_sae_format(tmp_path / "model.layers.24") == FORMAT_SPARSIFY
    sae = load_sae(SAELoadConfig(str(tmp_path / "model.layers.24"), model_name="llava-hf/llama3-llava-next-8b-hf"))
    assert (sae.cfg.arch, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == ("topk", D_IN, LATENTS, K)
    assert (sae.cfg.hook_name, sae.cfg.hook_layer) == ("layers.24", 24)
    assert sae.cfg.model_name == "llava-hf/llama3-llava-next-8b-hf"
    x = inputs()
    with torch.no_grad():
        theirs = coder.encode(x)
        acts = sae.encode(x)
        assert torch.equal(acts, dense(theirs.top_acts, theirs.top_indices))  # bit-identical activations
        # decoding: their embedding_bag sum against our dense matmul, equal to float32 rounding
        torch.testing.assert_close(sae.decode(acts), coder.decode(theirs.top_acts, theirs.top_indices),
                                   rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(sae(x), coder(x).sae_out, rtol=1e-6, atol=1e-5)


def test_ours_saved_as_sparsify_loads_in_sparse_coder(sparsify, tmp_path):
    g = torch.Generator().manual_seed(3)
    sae = SAE(SAEConfig(arch="topk", d_in=D_IN, d_sae=LATENTS, k=K, model_name="shapes-subject",
                        hook_name="layers.2", hook_layer=2), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 1, generator=g)
    sae.set_normalisation(torch.randn(D_IN, generator=g), 2.5)  # trained in a normalised space: folded on save
    folder = save_sparsify(sae, SparsifySaveConfig(str(tmp_path)))
    assert folder == tmp_path / "model.layers.2"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg == {"activation": "topk", "expansion_factor": LATENTS // D_IN, "normalize_decoder": True,
                   "num_latents": LATENTS, "k": K, "multi_topk": False, "skip_connection": False,
                   "transcode": False, "d_in": D_IN}
    assert sorted(load_file(folder / "sae.safetensors")) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "shapes-subject"
    coder = sparsify.SparseCoder.load_from_disk(folder)
    x = inputs(seed=5)
    with torch.no_grad():
        theirs = coder.encode(x)
        their_acts = dense(theirs.top_acts, theirs.top_indices)
        torch.testing.assert_close(sae.encode(x), their_acts, rtol=1e-5, atol=1e-5)  # unfolded in memory
        torch.testing.assert_close(sae(x), coder(x).sae_out, rtol=1e-5, atol=1e-4)
        back = load_sparsify(SparsifyLoadConfig(str(tmp_path), layer="layers.2"))  # model from config.json
        assert back.cfg.model_name == "shapes-subject" and back.cfg.hook_name == "layers.2"
        assert torch.equal(back.encode(x), their_acts)
        # and back again: sparsify -> ours -> sparsify keeps every tensor bit for bit
        again = save_sparsify(back, SparsifySaveConfig(str(tmp_path / "again")))
        a, b = load_file(folder / "sae.safetensors"), load_file(again / "sae.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_whitened_sae_saved_as_sparsify_keeps_its_function(sparsify, tmp_path):
    g = torch.Generator().manual_seed(7)
    sae = SAE(SAEConfig(arch="topk", d_in=D_IN, d_sae=LATENTS, k=K, whiten=0.01, hook_name="layers.1"), generator=g)
    a = torch.randn(D_IN, D_IN, generator=g)
    sae.set_normalisation(torch.randn(D_IN, generator=g), 2.5, a @ a.T / D_IN + 0.1 * torch.eye(D_IN))
    folder = save_sparsify(sae, SparsifySaveConfig(str(tmp_path)))
    assert json.loads((folder / "cfg.json").read_text())["normalize_decoder"] is False  # rows are not unit
    coder = sparsify.SparseCoder.load_from_disk(folder)
    x = inputs(seed=8)
    with torch.no_grad():
        theirs = coder.encode(x)
        torch.testing.assert_close(sae.encode(x), dense(theirs.top_acts, theirs.top_indices), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae(x), coder(x).sae_out, rtol=1e-4, atol=1e-4)


def test_ours_without_b_dec_on_input_keeps_its_function(sparsify, tmp_path):
    g = torch.Generator().manual_seed(4)
    sae = SAE(SAEConfig(arch="topk", d_in=D_IN, d_sae=LATENTS, k=K, apply_b_dec_to_input=False,
                        hook_name="layers.0"), generator=g)
    with torch.no_grad():
        sae.b_dec.normal_(0, 1, generator=g)
    folder = save_sparsify(sae, SparsifySaveConfig(str(tmp_path), prefix=""))
    assert folder.name == "layers.0"
    coder = sparsify.SparseCoder.load_from_disk(folder)
    x = inputs(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), coder(x).sae_out, rtol=1e-5, atol=1e-4)


def test_only_topk_saves(tmp_path):
    sae = SAE(SAEConfig(arch="relu", d_in=8, d_sae=16, hook_name="layers.1"))
    with pytest.raises(ValueError, match="TopK SAEs only; this SAE is 'relu'"):
        save_sparsify(sae, SparsifySaveConfig(str(tmp_path)))
    topk = SAE(SAEConfig(arch="topk", d_in=8, d_sae=16, k=2))
    with pytest.raises(ValueError, match="no hook_name"):
        save_sparsify(topk, SparsifySaveConfig(str(tmp_path)))


def test_hookpoint_run_directory(sparsify, tmp_path):
    """The multimodal-sae layout: a folder per hookpoint, natural order, chosen by any name of the layer."""
    for i, layer in enumerate((2, 10, 24)):
        random_coder(sparsify, seed=i).save_to_disk(tmp_path / f"model.layers.{layer}")
    (tmp_path / "config.json").write_text(json.dumps({"model": "llava-hf/llama3-llava-next-8b-hf"}))
    (tmp_path / "README.md").write_text("not an SAE")
    assert detect_sae_format(tmp_path) == FORMAT_SPARSIFY_RUN
    assert list(hookpoint_folders(tmp_path)) == ["model.layers.2", "model.layers.10", "model.layers.24"]
    x = inputs()
    ref = sparsify.SparseCoder.load_many(str(tmp_path), local=True)
    assert list(ref) == list(hookpoint_folders(tmp_path))
    for layer in (10, "10", "layers.10", "model.layers.10"):
        sae = load_sae(SAELoadConfig(str(tmp_path), layer=layer))
        assert (sae.cfg.hook_name, sae.cfg.model_name) == ("layers.10", "llava-hf/llama3-llava-next-8b-hf")
        with torch.no_grad():
            e = ref["model.layers.10"].encode(x)
            assert torch.equal(sae.encode(x), dense(e.top_acts, e.top_indices))
    assert load_sae(SAELoadConfig(str(tmp_path), layer=24, model_name="mine")).cfg.model_name == "mine"
    assert sae_weights_file(tmp_path, "24") == tmp_path / "model.layers.24" / "sae.safetensors"
    with pytest.raises(ValueError, match=r"several hookpoints \(model.layers.2, model.layers.10, model.layers.24\)"):
        load_sae(SAELoadConfig(str(tmp_path)))
    with pytest.raises(ValueError, match="no SAE for layer .5.; it holds model.layers.2, model.layers.10"):
        load_sae(SAELoadConfig(str(tmp_path), layer="5"))
    with pytest.raises(ValueError, match="not of layer 'layers.3'"):
        load_sae(SAELoadConfig(str(tmp_path / "model.layers.2"), layer="layers.3"))


def test_detects_saelens_and_rejects_non_sae(tmp_path):
    sae = SAE(SAEConfig(arch="topk", d_in=8, d_sae=16, k=2))
    sae.save(tmp_path / "ours")
    assert detect_sae_format(tmp_path / "ours") == FORMAT_SAELENS
    assert torch.equal(load_sae(SAELoadConfig(str(tmp_path / "ours"))).W_dec, sae.W_dec)
    assert sae_weights_file(tmp_path / "ours") == tmp_path / "ours" / "sae_weights.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no SAE at .*empty: expected cfg.json"):
        detect_sae_format(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="half has cfg.json but neither"):
        detect_sae_format(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        detect_sae_format(tmp_path / "missing")


@pytest.mark.parametrize("hookpoint, layer", [
    ("model.layers.24", "layers.24"), ("layers.3", "layers.3"), ("layers_7", "layers.7"),
    ("layers.3.mlp", "layers.3.mlp"), ("model.layers.5.self_attn", "layers.5.attn"),
    ("model.language_model.layers.31", "layers.31"), ("language_model.model.layers.0.mlp", "layers.0.mlp"),
])
def test_layer_names(hookpoint, layer):
    assert layer_for_hookpoint(hookpoint) == layer


def test_layer_names_back_and_bad():
    assert hookpoint_for_layer("layers.24") == "model.layers.24"
    assert hookpoint_for_layer("model.language_model.layers.2") == "model.layers.2"  # a module path
    assert hookpoint_for_layer("layers.4.attn", prefix="") == "layers.4.self_attn"
    assert hookpoint_for_layer("layers.4.mlp") == "model.layers.4.mlp"
    for bad in ("embed_tokens", "model.layers.2.input_layernorm", "layers.x"):
        with pytest.raises(ValueError, match="cannot tell the layer"):
            layer_for_hookpoint(bad)


def _folder(sparsify, tmp_path, name="model.layers.1"):
    folder = tmp_path / name
    random_coder(sparsify).save_to_disk(folder)
    return folder


@pytest.mark.parametrize("cfg, message", [
    ([1, 2, 3], "must hold a JSON object .* got a list"),
    ({"k": K, "num_latents": LATENTS}, "lacks d_in"),
    ({"d_in": D_IN, "num_latents": LATENTS}, "lacks k"),
    ({"d_in": D_IN, "k": "32", "num_latents": LATENTS}, "k must be a positive integer, got '32'"),
    ({"d_in": D_IN, "k": 0, "num_latents": LATENTS}, "k must be a positive integer, got 0"),
    ({"d_in": D_IN, "k": LATENTS + 1, "num_latents": LATENTS}, "k=385 is larger than num_latents=384"),
    ({"d_in": D_IN, "k": K, "num_latents": LATENTS, "activation": "groupmax"}, "activation 'groupmax' is not supported"),
    ({"d_in": D_IN, "k": K, "num_latents": LATENTS, "transcode": True}, "transcoder"),
    ({"d_in": D_IN, "k": K, "num_latents": LATENTS, "skip_connection": True}, "skip_connection=true"),
    ({"d_in": D_IN, "k": K, "num_latents": LATENTS, "multi_topk": "no"}, "multi_topk must be true or false"),
])
def test_bad_cfg_is_one_clear_error_naming_the_file(sparsify, tmp_path, cfg, message):
    folder = _folder(sparsify, tmp_path)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SparsifyFormatError, match=message) as e:
        load_sae(SAELoadConfig(str(folder)))
    assert str(folder / "cfg.json") in str(e.value)


def test_bad_json_and_bad_weights_name_the_file(sparsify, tmp_path):
    folder = _folder(sparsify, tmp_path)
    good_cfg = (folder / "cfg.json").read_text()
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SparsifyFormatError, match="cfg.json is not valid JSON"):
        load_sae(SAELoadConfig(str(folder)))
    (folder / "cfg.json").write_text(good_cfg)

    # num_latents in cfg.json that the tensors do not have
    (folder / "cfg.json").write_text(json.dumps({**json.loads(good_cfg), "num_latents": 2 * LATENTS}))
    with pytest.raises(SparsifyFormatError, match=r"sae.safetensors: encoder.weight has shape \(384, 48\), but "
                                                  r".*cfg.json \(d_in=48, num_latents=768\) needs \(768, 48\)"):
        load_sae(SAELoadConfig(str(folder)))
    # num_latents 0: sparsify's default, d_in * expansion_factor
    (folder / "cfg.json").write_text(json.dumps({**json.loads(good_cfg), "num_latents": 0,
                                                 "expansion_factor": LATENTS // D_IN}))
    assert load_sae(SAELoadConfig(str(folder))).cfg.d_sae == LATENTS
    (folder / "cfg.json").write_text(good_cfg)

    weights = load_file(folder / "sae.safetensors")
    save_file({**weights, "b_dec": weights["b_dec"][:-1].contiguous()}, folder / "sae.safetensors")
    with pytest.raises(SparsifyFormatError, match=r"b_dec has shape \(47,\)"):
        load_sae(SAELoadConfig(str(folder)))
    save_file({k: v for k, v in weights.items() if k != "W_dec"}, folder / "sae.safetensors")
    with pytest.raises(SparsifyFormatError, match=r"sae.safetensors: tensors do not match .*missing \['W_dec'\]"):
        load_sae(SAELoadConfig(str(folder)))
    save_file({**weights, "W_skip": torch.zeros(D_IN, D_IN)}, folder / "sae.safetensors")
    with pytest.raises(SparsifyFormatError, match=r"unexpected \['W_skip'\]"):
        load_sae(SAELoadConfig(str(folder)))
    (folder / "sae.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SparsifyFormatError, match="sae.safetensors is not a readable safetensors file"):
        load_sae(SAELoadConfig(str(folder)))


def test_folder_name_must_name_a_layer(sparsify, tmp_path):
    folder = _folder(sparsify, tmp_path, name="embed_tokens")
    with pytest.raises(ValueError, match="embed_tokens: cannot tell the layer .* name the folder after its hookpoint"):
        load_sae(SAELoadConfig(str(folder)))


def test_half_precision_weights_keep_their_dtype(sparsify, tmp_path):
    coder = random_coder(sparsify, dtype=torch.bfloat16)
    coder.save_to_disk(tmp_path / "layers.1")
    sae = load_sae(SAELoadConfig(str(tmp_path / "layers.1")))
    assert sae.cfg.dtype == "bfloat16" and sae.W_dec.dtype == torch.bfloat16
    x = inputs().bfloat16()
    with torch.no_grad():
        e = coder.encode(x)
        ours, theirs = sae.encode(x), dense(e.top_acts, e.top_indices)
    # bfloat16: sparsify adds the bias inside F.linear, we after the matmul, so values differ by a rounding
    # step and near-ties can swap; the selected latents agree almost everywhere
    agree = ((ours > 0) & (theirs > 0)).sum() / (theirs > 0).sum()
    assert agree > 0.97, float(agree)
    assert load_sae(SAELoadConfig(str(tmp_path / "layers.1"), dtype="float32")).W_dec.dtype == torch.float32


def test_a_sparsify_sae_finds_its_layer_on_the_subject(sparsify, tmp_path):
    """model.layers.N is the subject's decoder layer N, as steering resolves it (interp.model.layers)."""
    from interp.model.models import load_model
    from steering.interventions import sae_hook

    lm = load_model("shapes-subject", device="cpu")
    width = lm.model.config.get_text_config().hidden_size
    coder = sparsify.SparseCoder(width, sparsify.SparseCoderConfig(num_latents=4 * width, k=4))
    coder.save_to_disk(tmp_path / "model.layers.2")
    sae = load_sae(SAELoadConfig(str(tmp_path / "model.layers.2"), model_name="shapes-subject"))
    hook = sae_hook(lm, sae)
    assert (hook.name, hook.index, hook.site) == ("layers.2", 2, "resid")
    assert hook.module_path.endswith("layers.2")


def test_every_stage_takes_a_sparsify_folder_as_the_runs_sae(sparsify, tmp_path, tiny_path):
    """A multimodal-sae hookpoint folder linked as RUN/sae: SAE.load, the fingerprint, features, the feature
    sources and steering take it; the layer comes from the folder's name, the model from the caller."""
    from explain.feature_reader import FeatureSources
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.writer import CacheConfig, build_cache
    from interp.infra.layout import RunLayout
    from saes.sae import sae_fingerprint
    from steering.interventions import Intervention
    from steering.steer import Query, load_setup, steer_one

    model = str(tiny_path("llava"))
    layout = RunLayout.of(tmp_path / "run")
    build_cache(CacheConfig(run=str(layout.root), model=model, layer="1", samples=8, batch_size=8, part_samples=8,
                            dtype="float32"))
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=128, k=4))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
    coder.save_to_disk(tmp_path / "release" / "model.layers.1")
    layout.sae.symlink_to(tmp_path / "release" / "model.layers.1")
    sae = SAE.load(layout.sae)
    assert (sae.cfg.hook_name, sae.cfg.d_sae, sae.cfg.model_name) == ("layers.1", 128, None)
    assert len(sae_fingerprint(layout.sae)) == 64
    out = compute_features(FeaturesConfig(run=str(layout.root), device="cpu", progress=False))
    with FeatureSources.open(layout.root) as src:
        f = int(src.features.summary_table()["n_active"].argmax())
        ex = src.features.top(f)[0]
        _, acts = src.token_activations(f, ex.sample)
        assert acts.max() == pytest.approx(ex.max, rel=1e-5)
    setup = load_setup(layout.root, model=model, device="cpu")  # the model is named by the caller
    assert setup.hook.name == "layers.1"
    result = steer_one(setup, Query.load("what color is the circle ?", ex.image_ref),
                       [Intervention(f, "clamp", 2.0, "max", "image")], max_new_tokens=2)
    assert isinstance(result.steered, str) and out.exists()
