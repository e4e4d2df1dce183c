"""The bad-input matrix: each case is one `interp` command that must fail with exit code 2 and a
single line naming the problem (and usually the fix), leaving every existing file as it was."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from interp.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small shapes run: cache (subject layer 2), SAE, features, a second SAE of another width."""
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.writer import CacheConfig, build_cache
    from interp.cache.reader import ActivationReader
    from saes.sae import SAE, SAEConfig
    from saes.train import TrainConfig, train

    root = tmp_path_factory.mktemp("bad_input")
    cache = build_cache(CacheConfig(model="shapes-subject", layer="2", n=120, batch_size=40), root / "acts.h5")
    with ActivationReader(cache) as r:
        train(SAEConfig(arch="topk", d_in=r.d, d_sae=64, k=4), TrainConfig(steps=50, batch_size=256, progress=False),
              r, root / "sae")
    compute_features(cache, root / "sae" / "sae", root / "features.h5", FeaturesConfig(progress=False))
    SAE(SAEConfig(arch="topk", d_in=96, d_sae=32, k=2)).save(root / "narrow")
    SAE(SAEConfig(arch="topk", d_in=128, d_sae=64, k=4)).save(root / "other")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (200, 30 * i, 30)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "junk.h5").write_bytes(b"this is not an HDF5 file" * 50)
    shutil.copy(cache, root / "truncated.h5")
    with open(root / "truncated.h5", "r+b") as f:
        f.truncate(4096)
    shutil.copy(cache, root / "nan.h5")
    with h5py.File(root / "nan.h5", "r+") as f:
        a = f["activations"]
        a[5, 0] = np.nan
        a[77, 3] = np.inf
    shutil.copy(cache, root / "empty.h5")
    with h5py.File(root / "empty.h5", "r+") as f:
        for name in ("activations", "tokens"):
            data = f[name][:0]
            del f[name]
            f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]))
    (root / "spec.yaml").write_text(f"sae: {root / 'sae' / 'sae'}\nfeatures: [1]\nstrengths: [1.0]\ncolour: red\n")
    (root / "empty_dir").mkdir()
    return root


def _snapshot(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


CASES = {
    "unknown organism": (["layers", "shapes-giant"], "shapes-subject, shapes-explainer"),
    "unknown model id": (["cache", "--model", "no-such-org/no-such-model", "--out", "{root}/x.h5"], "no-such-org/no-such-model"),
    "unknown layer": (["cache", "--layer", "9", "--out", "{root}/x.h5"], "layers.0"),
    "template without image slot": (["cache", "--prompt", "describe the image .", "--out", "{root}/x.h5"], "no image slot"),
    "resume into another layer's cache": (["cache", "--layer", "1", "--samples", "120", "--out", "{root}/acts.h5"], "other settings"),
    "missing image folder": (["cache", "--data", "folder:{root}/nowhere", "--out", "{root}/x.h5"], "does not exist"),
    "unreadable image with --strict": (["cache", "--data", "folder:{root}/images", "--strict", "--out", "{root}/x.h5"], "broken.png"),
    "unknown roles": (["cache", "--roles", "pixels", "--out", "{root}/x.h5"], "unknown roles"),
    "corrupt HDF5": (["train", "--cache", "{root}/junk.h5", "--out", "{root}/t1"], "not a readable HDF5"),
    "truncated HDF5": (["train", "--cache", "{root}/truncated.h5", "--out", "{root}/t2"], "truncated"),
    "NaN activations": (["train", "--cache", "{root}/nan.h5", "--steps", "5", "--batch-size", "64", "--out", "{root}/t3"], "NaN"),
    "empty cache": (["train", "--cache", "{root}/empty.h5", "--out", "{root}/t4"], "no"),
    "missing cache": (["eval", "--sae", "{root}/sae/sae", "--cache", "{root}/absent.h5"], "no activation cache"),
    "missing SAE": (["eval", "--sae", "{root}/absent", "--cache", "{root}/acts.h5"], "no SAE"),
    "wrong SAE width": (["eval", "--sae", "{root}/narrow", "--cache", "{root}/acts.h5"], "96"),
    "features file from another SAE": (["explain", "{root}", "--sae", "{root}/other", "--no-progress"], "another SAE"),
    "explain a feature out of range": (["explain", "{root}", "--features", "999", "--no-progress"], "999"),
    "steer a feature out of range": (["steer", "--sae", "{root}/sae/sae", "--image", "shapes:test:0:0", "--prompt",
                                      "what color is the circle ?", "--feature", "999", "--value", "2"], "999"),
    "NaN strength": (["steer", "--sae", "{root}/sae/sae", "--image", "shapes:test:0:0", "--prompt",
                      "what color is the circle ?", "--feature", "1", "--value", "nan"], "nan"),
    "steering spec with unknown keys": (["steer", "sweep", "--spec", "{root}/spec.yaml", "--out", "{root}/sweep"],
                                        "colour"),
    "recovery on a cache without ground truth": (["recovery", "--sae", "{root}/sae/sae", "--cache", "{root}/empty.h5"], "no"),
    "unknown SAE architecture in a benchmark": (["benchmark", "--cache", "{root}/acts.h5", "--archs", "topk,magic",
                                                 "--out", "{root}/bench"], "magic"),
    "the app on a directory that does not exist": (["app", "{root}/nowhere"], "nowhere"),
    # exit code 1: the run finished, the failure is recorded per feature and retried on the next run
    "explainer server down": (["explain", "{root}", "--explainer", "http://127.0.0.1:9/v1", "--top", "1",
                               "--retries", "0", "--timeout", "2", "--max-failures", "1", "--no-progress"],
                              "127.0.0.1:9", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_loses_nothing(case, run, capsys):
    argv, expected, *want_code = CASES[case]
    before = _snapshot(run)
    code = main([a.format(root=run) for a in argv])
    captured = capsys.readouterr()
    err = (captured.err + captured.out).strip().splitlines()
    assert code == (want_code[0] if want_code else 2), f"{case}: exit code {code}"
    message = [line for line in err if "error" in line.lower()]
    assert message, f"{case}: no error line in {err[-3:]}"
    assert expected.lower() in message[-1].lower(), f"{case}: {message[-1]!r} does not mention {expected!r}"
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before, f"{case}: an existing file changed"
    new = set(after) - set(before)
    assert not any(p.suffix == ".h5" for p in new), f"{case}: left a half-written cache {new}"


def test_the_matrix_is_at_least_twenty_cases():
    assert len(CASES) >= 20
    json.dumps(CASES)
