"""interp cache: rows, token table and metadata on every family; resume after kill -9; bad input."""

import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image


from interp.cache.data import DataError, open_source
from interp.cache.format import is_image_patch, is_user_text, role_code
from interp.cache.reader import ActivationReader
from interp.cache.writer import CacheConfig, CacheWriter, build_cache
from interp.infra.identity import IdentityError
from interp.model.hooks import capture
from interp.model.inputs import PromptError, model_inputs, prompts
from interp.model.layers import UnknownLayerError, resolve_layer


def cfg(model, run, **kw):
    return CacheConfig(run=str(run), model=str(model), layer="1", samples=6, batch_size=4, part_samples=4, **kw)


def test_cache_every_family(multimodal_path, tmp_path):
    family, path = multimodal_path
    writer = CacheWriter(cfg(path, tmp_path, dtype="float32"))
    out = build_cache(writer.cfg, writer)
    samples = [open_source("shapes", 6)[i] for i in range(3)]
    inputs = model_inputs(writer.lm, samples, prompts(writer.lm, samples, writer.cfg.prompt_template)[0])
    hook = writer.hook.module_path
    assert torch.equal(capture(writer.lm.model, inputs, hook, "nnsight"), capture(writer.lm.model, inputs, hook, "torch"))
    with ActivationReader(out) as r:
        assert r.meta["family"] == family and r.meta["layer"] == "layers.1"
        assert is_image_patch(r.tokens["role"]).all()
        assert r.n_samples == 6 and sum(s.n_rows for s in r.iter_samples()) == r.n_rows > 0
        starts = np.cumsum(r.samples_table["n_rows"]) - r.samples_table["n_rows"]
        assert (r.samples_table["row_start"] == starts).all()
        for s in r.iter_samples():  # the token table's sample is the samples-table row
            assert (s.tokens["sample"] == s.index).all() and s.source_index == s.index and s.image_ref
            assert s.prompt == "describe the image ." and len(s.positions) == s.n_rows
        assert (r.tokens["x1"] > r.tokens["x0"]).all()
        from importlib.metadata import version

        assert r.meta["versions"]["torch"] == version("torch") and r.meta["versions"]["transformers"] == version("transformers")
        assert r.meta["data"]["kind"] == "shapes" and len(r.meta["data_fingerprint"]) == 16
        assert r.meta["processor"]["processor"].endswith("Processor") and r.meta["seed"] == 0


def test_cached_rows_equal_a_direct_forward(tiny_path, tmp_path):
    """The rows are exactly the layer's outputs at the image-patch positions, for both engines.
    (Layer 0: HF applies the final norm to the last entry of hidden_states.)"""
    path = tiny_path("llava")
    c = {e: CacheConfig(run=str(tmp_path / e), model=str(path), layer="0", samples=6, batch_size=4, part_samples=4,
                        dtype="float32", engine=e) for e in ("nnsight", "torch")}
    a, b = (ActivationReader(build_cache(c[e])) for e in ("nnsight", "torch"))
    assert torch.equal(a.read(0, a.n_rows), b.read(0, b.n_rows))
    w = CacheWriter(c["torch"])
    samples = [open_source("shapes", 6)[i] for i in range(4)]
    inputs = model_inputs(w.lm, samples, prompts(w.lm, samples, w.cfg.prompt_template)[0])
    with torch.no_grad():
        full = w.lm.model(**inputs, output_hidden_states=True).hidden_states[1]
    is_image = inputs["input_ids"] == w.lm.model.config.image_token_id
    assert torch.equal(a.read(0, int(is_image.sum())), full[is_image])
    hook = resolve_layer(w.lm, 0).module_path
    assert torch.equal(capture(w.lm.model, inputs, hook, "nnsight"), capture(w.lm.model, inputs, hook, "torch"))


def test_resume_refuses_other_settings_and_finishes_once(tiny_path, tmp_path):
    path = tiny_path("llava")
    out = build_cache(cfg(path, tmp_path))
    before = out.stat().st_mtime_ns
    build_cache(cfg(path, tmp_path))  # complete: nothing redone
    assert out.stat().st_mtime_ns == before
    with pytest.raises(IdentityError, match=r"was made with other settings \(layer: recorded '\"layers.1\"', now "
                                            r"'\"layers.0\"'"):
        build_cache(CacheConfig(run=str(tmp_path), model=str(path), layer="0", samples=6, batch_size=4, part_samples=4))


def test_roles_and_text_models(tiny_path, hooked_transformer, tmp_path):
    path = tiny_path("llava")
    out = build_cache(cfg(path, tmp_path / "all", roles=("image_patch", "text", "template")))
    roles = set(ActivationReader(out).tokens["role"])
    assert {role_code("image_patch"), role_code("text")} <= roles
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["what color is the circle ?", "describe the image .", "hello world"]})
    ds.to_parquet(str(tmp_path / "texts.parquet"))
    out = build_cache(CacheConfig(run=str(tmp_path / "text"), model=str(tiny_path("llama")), layer="-1",
                                  data=str(tmp_path / "texts.parquet"), prompt_template="{text}", roles=("text",),
                                  batch_size=2, part_samples=2))
    r = ActivationReader(out)
    assert r.meta["kind"] == "causal-lm" and r.n_samples == 3 and r.n_rows >= 6
    assert is_user_text(r.tokens["role"]).all() and not r.sample(0).has_image
    # a TransformerLens model built in code, cached through the same path
    from interp.model.models import wrap_model

    tl_model, tl_tok = hooked_transformer
    c = CacheConfig(run=str(tmp_path / "tl"), model="tl-tiny", layer="1", data=str(tmp_path / "texts.parquet"),
                    prompt_template="{text}", roles=("text",), batch_size=2, part_samples=2, dtype="float32")
    out = build_cache(c, CacheWriter(c, wrap_model(tl_model, tl_tok, "tl-tiny")))
    r_tl = ActivationReader(out)
    assert r_tl.meta["kind"] == "hooked-transformer" and r_tl.meta["module_path"] == "blocks.1.hook_resid_post"
    n_tokens = sum(len(tl_tok(t)["input_ids"]) for t in ds["text"])
    adds_bos = tl_tok.bos_token_id is not None and tl_tok("a")["input_ids"][0] == tl_tok.bos_token_id
    assert r_tl.n_rows == n_tokens - 3 * adds_bos  # every token but a BOS is prompt text
    with torch.no_grad():
        _, cache = tl_model.run_with_cache(tl_tok("hello world", return_tensors="pt")["input_ids"])
    third = r_tl.sample(2)
    assert torch.allclose(r_tl.sample_activations(third), cache["blocks.1.hook_resid_post"][0][-third.n_rows:],
                          atol=1e-5)


def test_bad_input_is_named_and_nothing_is_written(tiny_path, tmp_path):
    path = tiny_path("llava")
    with pytest.raises(UnknownLayerError, match=r"unknown layer 7 \(site 'resid'\) in .*; valid: layers.0, layers.1"):
        build_cache(CacheConfig(run=str(tmp_path / "a"), model=str(path), layer="7", samples=2))
    with pytest.raises(PromptError, match=r"prompt template 'describe the image .' has no image slot"):
        build_cache(cfg(path, tmp_path / "b", prompt_template="describe the image ."))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot read image file:.*/3.png: .* \(drop --strict to skip such images\)"):
        build_cache(cfg(path, tmp_path / "strict", data=f"folder:{folder}", strict=True))
    assert not (tmp_path / "strict" / "activations.h5").exists()
    out = build_cache(cfg(path, tmp_path / "skip", data=f"folder:{folder}"))
    r = ActivationReader(out)
    assert r.n_samples == 4 and "3.png" in r.meta["skipped"][0]["image_ref"]
    assert [s.source_index for s in r.iter_samples()] == [0, 1, 2, 4]
    assert [s.index for s in r.iter_samples()] == [0, 1, 2, 3]
    for name in ("a", "b"):
        assert not (tmp_path / name / "activations.h5").exists()
        assert not (tmp_path / name / "activations.h5.parts").exists()


def _cache_cmd(path, run, samples=24, batch=2):
    return [sys.executable, "-m", "interp.cli", "cache", str(run), "--model", str(path), "--layer", "1", "--samples",
            str(samples), "--batch-size", str(batch), "--part-samples", "2", "--dtype", "float32"]


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tiny_path, tmp_path):
    path = tiny_path("llava")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = lambda run: _cache_cmd(path, run, samples=200, batch=1)  # noqa: E731  100 parts, slow enough to interrupt
    subprocess.run(cmd(tmp_path / "straight"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed" / "activations.h5"
    parts = tmp_path / "killed" / "activations.h5.parts"
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.randint(2, 20)  # a random point of the run
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.h5"))) < kill_after:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the kill came too late to test anything"
    assert kill_after <= len(list(parts.glob("part-*.h5"))) < 100
    subprocess.run(cmd(tmp_path / "killed"), check=True, env=env, capture_output=True)
    with h5py.File(tmp_path / "straight" / "activations.h5") as a, h5py.File(out) as b:
        assert np.array_equal(a["activations"][:], b["activations"][:])
        assert np.array_equal(a["tokens"][:], b["tokens"][:])
        assert np.array_equal(a["samples"][:], b["samples"][:])
    assert not parts.exists()


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_rows(tiny_path, tmp_path):
    path = tiny_path("llava")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cache_cmd(path, tmp_path / "one"), check=True, env=env, capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "interp.cli", *_cache_cmd(path, tmp_path / "two")[3:]]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    with h5py.File(tmp_path / "one" / "activations.h5") as a, h5py.File(tmp_path / "two" / "activations.h5") as b:
        assert np.array_equal(a["activations"][:], b["activations"][:])
        assert np.array_equal(a["tokens"][:], b["tokens"][:])
        assert np.array_equal(a["samples"][:], b["samples"][:])
