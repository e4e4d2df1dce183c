"""The bad-input matrix: each case is one `interp` command that must fail with exit code 2 and a single
line naming the problem (and usually the fix), leaving every existing file as it was."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def root(shapes_run, tmp_path_factory):
    """The shared shapes run, plus broken inputs, each in a run directory of its own."""
    from saes.sae import SAE, SAEConfig

    root = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(shapes_run, root / "run", symlinks=True)  # a module-wide copy: the cases must not change it
    cache = root / "run" / "activations.h5"
    for name in ("narrow", "other", "junk", "truncated", "nan", "empty", "nowhere-cache"):
        (root / name).mkdir()
    SAE(SAEConfig(arch="topk", d_in=96, d_sae=32, k=2)).save(root / "narrow" / "sae")
    (root / "narrow" / "activations.h5").symlink_to(cache)
    SAE(SAEConfig(arch="topk", d_in=128, d_sae=64, k=4)).save(root / "other" / "sae")
    for name in ("activations.h5", "features.h5"):
        (root / "other" / name).symlink_to(root / "run" / name)
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (200, 30 * i, 30)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "junk" / "activations.h5").write_bytes(b"this is not an HDF5 file" * 50)
    shutil.copy(cache, root / "truncated" / "activations.h5")
    with open(root / "truncated" / "activations.h5", "r+b") as f:
        f.truncate(4096)
    shutil.copy(cache, root / "nan" / "activations.h5")
    with h5py.File(root / "nan" / "activations.h5", "r+") as f:
        a = f["activations"]
        a[5, 0] = np.nan
        a[77, 3] = np.inf
    shutil.copy(cache, root / "empty" / "activations.h5")
    with h5py.File(root / "empty" / "activations.h5", "r+") as f:
        for name in ("activations", "tokens"):
            data = f[name][:0]
            del f[name]
            f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]))
    shutil.copytree(root / "run" / "sae", root / "empty" / "sae")
    (root / "spec.yaml").write_text("features: [1]\nstrengths: [1.0]\ncolour: red\n")
    for name, weights, cfg in SAE_CASES:  # an SAE broken one way each, next to the good cache
        (root / name).mkdir()
        shutil.copytree(root / "run" / "sae", root / name / "sae")
        (root / name / "activations.h5").symlink_to(cache)
        w, c = root / name / "sae" / "sae_weights.safetensors", root / name / "sae" / "cfg.json"
        if weights is not None:
            w.write_bytes(weights(w.read_bytes()))
        if cfg is not None:
            c.write_text(json.dumps(cfg(json.loads(c.read_text()))))
    return root


def _without(key):
    def edit(cfg):
        del cfg[key]
        return cfg
    return edit


SAE_CASES = [("sae-empty", lambda b: b"", None), ("sae-truncated", lambda b: b[: len(b) // 2], None),
             ("sae-cfg-list", None, lambda cfg: [cfg]), ("sae-cfg-no-d-in", None, _without("d_in")),
             ("sae-cfg-d-sae", None, lambda cfg: {**cfg, "d_sae": 64}),
             ("sae-cfg-d-in", None, lambda cfg: {**cfg, "d_in": 96}),
             ("sae-cfg-arch", None, lambda cfg: {**cfg, "architecture": "jumprelu"})]


def _snapshot(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


STEER = ["--image", "shapes:test:0:0", "--prompt", "what color is the circle ?"]
CASES = {
    "unknown organism": (["layers", "shapes-giant"], "unknown organism 'shapes-giant'; known organisms: shapes-subject, "
                                                     "shapes-explainer"),
    "unknown model id": (["cache", "{root}/x", "--model", "no-such-org/no-such-model"],
                         "cannot load model 'no-such-org/no-such-model'"),
    "unknown layer": (["cache", "{root}/x", "--layer", "9"], "unknown layer 9 (site 'resid') in shapes-subject; valid: "
                                                             "layers.0 … layers.7, each with .attn and .mlp"),
    "template without image slot": (["cache", "{root}/x", "--prompt-template", "describe the image ."],
                                    "has no image slot: put {{image}} where the image goes"),
    "resume into another layer's cache": (["cache", "{root}/run", "--layer", "1", "--samples", "120"],
                                          "was made with other settings (layer: recorded '\"layers.4\"', now "
                                          "'\"layers.1\"'"),
    "missing image folder": (["cache", "{root}/x", "--data", "folder:{root}/nowhere"], "/nowhere does not exist"),
    "unreadable image with --strict": (["cache", "{root}/x", "--data", "folder:{root}/images", "--strict"],
                                       "cannot read image file:{root}/images/broken.png"),
    "unknown roles": (["cache", "{root}/x", "--roles", "pixels"], "unknown roles ['pixels']; known: ['image_patch'"),
    "corrupt HDF5": (["train", "{root}/junk"], "activations.h5 is not a readable HDF5 file"),
    "truncated HDF5": (["train", "{root}/truncated"], "it may be truncated: re-run `interp cache`"),
    "NaN activations": (["train", "{root}/nan", "--steps", "5", "--batch-size", "64"],
                        "NaN or Inf in rows"),
    "empty cache": (["train", "{root}/empty"], "the activation source is empty (n_rows=0): nothing to train on"),
    "no cache in the run": (["train", "{root}/nowhere-cache"], "no activation cache at {root}/nowhere-cache/activations.h5: "
                                                               "make one with `interp cache"),
    "missing SAE": (["eval", "{root}/nowhere-cache"], "no SAE at {root}/nowhere-cache/sae: cfg.json is missing"),
    "wrong SAE width": (["eval", "{root}/narrow"], "this SAE takes inputs of width d_in=96, but got width 128"),
    "features file from another SAE": (["explain", "{root}/other", "--no-progress"],
                                       "features file from another SAE"),
    "explain a feature out of range": (["explain", "{root}/run", "--features", "999", "--no-progress"],
                                       "feature index out of range: [999]; this SAE has 32 features"),
    "a feature index that is not a number": (["explain", "{root}/run", "--features", "3,x"],
                                             "argument --features: --features: 'x' is not a valid int"),
    "steer a feature out of range": (["steer", "{root}/run", *STEER, "--features", "999", "--value", "2"],
                                     "feature 999 is out of range"),
    "NaN strength": (["steer", "{root}/run", *STEER, "--features", "1", "--value", "nan"],
                     "value of the intervention on feature 1 must be finite, got nan"),
    "steering spec with unknown keys": (["sweep", "{root}/run", "--spec", "{root}/spec.yaml"],
                                        "unknown key 'colour' in the sweep spec; valid keys: features"),
    "recovery on a cache without ground truth": (["recovery", "{root}/empty"], "no image tokens of shapes-world images"),
    "unknown SAE architecture in a benchmark": (["benchmark", "{root}/bench", "--cache", "{root}/run/activations.h5",
                                                 "--archs", "topk,magic"], "unknown 'magic'; choose from topk"),
    "an empty SAE weights file": (["eval", "{root}/sae-empty"], "sae-empty/sae/sae_weights.safetensors is not a "
                                                                 "readable safetensors file"),
    "a truncated SAE weights file": (["eval", "{root}/sae-truncated"], "sae-truncated/sae/sae_weights.safetensors is "
                                                                       "not a readable safetensors file"),
    "an SAE cfg.json that is a list": (["eval", "{root}/sae-cfg-list"], "sae-cfg-list/sae/cfg.json holds a JSON list, "
                                                                        "not an object of SAE settings"),
    "an SAE cfg.json without d_in": (["eval", "{root}/sae-cfg-no-d-in"], "sae-cfg-no-d-in/sae/cfg.json has no 'd_in'"),
    "an SAE cfg.json whose d_sae is not the weights'": (["eval", "{root}/sae-cfg-d-sae"], "cfg.json does not describe "
                                                        "{root}/sae-cfg-d-sae/sae/sae_weights.safetensors: it says "
                                                        "d_sae=64, but the weights have d_sae=32"),
    "an SAE cfg.json whose d_in is not the weights'": (["eval", "{root}/sae-cfg-d-in"], "it says d_in=96, but the "
                                                                                          "weights have d_in=128"),
    "an SAE cfg.json whose architecture is not the weights'": (["eval", "{root}/sae-cfg-arch"], "it says "
                                                               "architecture='jumprelu', but the weights are a topk SAE"),
    "zero samples per part": (["cache", "{root}/x", "--part-samples", "0"], "argument --part-samples: must be at "
                                                                             "least 1, got 0"),
    "zero samples per batch (cache)": (["cache", "{root}/x", "--batch-size", "0"], "argument --batch-size: must be at "
                                                                                    "least 1, got 0"),
    "zero rows per batch (train)": (["train", "{root}/run", "--batch-size", "0"], "argument --batch-size: must be at "
                                                                                   "least 1, got 0"),
    "zero samples": (["cache", "{root}/x", "--samples", "0"], "argument --samples: must be at least 1, got 0"),
    "an SAE of zero features": (["train", "{root}/x", "--d-sae", "0"], "argument --d-sae: must be at least 1, got 0"),
    "an empty feature list": (["explain", "{root}/run", "--features", ""], "argument --features: --features was given "
                                                                           "no values (''): give at least one, or "
                                                                           "leave --features out"),
    "notebooks on a run without a cache": (["notebooks", "{root}/nowhere-cache"], "no activation cache at "
                                           "{root}/nowhere-cache/activations.h5: the notebooks read a run made by "
                                           "`interp demo"),
    "the app on a directory that does not exist": (["app", "{root}/nowhere"], "no run directory at {root}/nowhere: "
                                                                              "make one with `interp demo"),
    # exit code 1: the run finished, the failure is recorded per feature and retried on the next run
    "explainer server down": (["explain", "{root}/run", "--explainer", "http://127.0.0.1:9/v1", "--densest", "1",
                               "--retries", "0", "--timeout", "2", "--max-failures", "1", "--no-progress"],
                              "cannot reach the explainer server at http://127.0.0.1:9/v1", 1),
}


def test_library_configs_refuse_what_the_options_refuse():
    """The bounds live on the config fields: a library caller gets the same message, naming the option."""
    from interp.cache.writer import CacheConfig
    from saes.train import TrainConfig

    for make, option in ((lambda: CacheConfig(part_samples=0), "--part-samples"),
                         (lambda: CacheConfig(batch_size=0), "--batch-size"), (lambda: CacheConfig(samples=0), "--samples"),
                         (lambda: TrainConfig(batch_size=0), "--batch-size"), (lambda: TrainConfig(steps=-1), "--steps")):
        with pytest.raises(ValueError, match=f"^{option} must be at least 1, got "):
            make()
    assert CacheConfig(samples=None).samples is None  # None (the whole source) stays allowed


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_loses_nothing(case, root, cli):
    argv, expected, *want_code = CASES[case]
    before = _snapshot(root)
    paths_before = set(p.relative_to(root) for p in root.rglob("*"))
    r = cli(*[a.format(root=root) for a in argv])
    assert r.code == (want_code[0] if want_code else 2), f"{case}: exit code {r.code}: {r.err[-500:]}"
    errors = [line for line in (r.err + r.out).splitlines() if "error:" in line]  # progress bars aside
    assert "Traceback" not in r.err and len(errors) == 1, f"{case}: {errors or r.err[-500:]}"
    assert expected.format(root=root) in errors[0], f"{case}: {errors[0]!r} does not say {expected!r}"
    if not want_code:  # a line of its own, not glued onto a progress bar's last state
        assert errors[0].startswith(f"interp {argv[0]}: error: "), f"{case}: not a line of its own: {errors[0]!r}"
    after = _snapshot(root)
    recorded = ("explainer_cache.jsonl", "explanations.jsonl", "explain_run.json") if want_code else ()
    changed = [k for k in before if after.get(k) != before[k] and k.name not in recorded]
    assert not changed, f"{case}: existing files changed: {changed}"
    new = set(after) - set(before)
    assert not any(p.suffix == ".h5" for p in new), f"{case}: left a half-written cache {new}"
    if not want_code:  # refused: nothing at all is left behind (no run directory, no parts folder)
        left = sorted(p.relative_to(root) for p in root.rglob("*"))
        assert not set(left) - paths_before, f"{case}: left {sorted(set(left) - paths_before)}"
