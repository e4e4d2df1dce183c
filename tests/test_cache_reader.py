import json

import h5py
import numpy as np
import pytest
import torch

from interp.cache.format import FORMAT, empty_samples
from interp.cache.reader import ActivationReader, CacheError


def write_cache(path, n=5000, d=16, roles=None, bad_rows=()):
    from interp.cache.format import TOKEN_DTYPE, role_code

    x = np.arange(n * d, dtype=np.float32).reshape(n, d) / (n * d)
    x[:, 0] = np.arange(n)  # column 0 identifies the row
    for r in bad_rows:
        x[r, 3] = np.nan
    tok = np.zeros(n, TOKEN_DTYPE)
    tok["sample"] = np.arange(n) // 10
    tok["position"] = np.arange(n) % 10
    tok["role"] = roles if roles is not None else role_code("image_patch")
    samples = empty_samples(n // 10)
    samples["source_index"] = np.arange(n // 10)
    samples["n_rows"] = 10
    samples["row_start"] = np.arange(n // 10) * 10
    samples["image_ref"] = [f"shapes:train:{i}:0" for i in range(n // 10)]
    samples["prompt"] = "describe the image ."
    with h5py.File(path, "w") as f:
        f.create_dataset("activations", data=x)
        f.create_dataset("tokens", data=tok)
        f.create_dataset("samples", data=samples)
        f.attrs["format"] = FORMAT
        f.attrs["model"] = json.dumps("tiny")
        f.attrs["d"] = d
    return x


def ids(batch):
    return batch[:, 0].long().tolist()


def test_batches_are_a_function_of_seed_and_index(tmp_path):
    write_cache(tmp_path / "c.h5")
    r = ActivationReader(tmp_path / "c.h5", block_rows=256, buffer_blocks=4)
    it = r.batches(100, seed=3)
    first = [ids(next(it)) for _ in range(120)]  # more than one epoch (5000 rows / 100)
    flat = [i for b in first[:40] for i in b]
    assert len(set(flat)) == len(flat), "a row repeats inside an epoch"
    assert len(set(first[0]) & set(range(100))) < 50, "batches are not shuffled"
    resumed = r.batches(100, seed=3, start_batch=57)
    assert [ids(next(resumed)) for _ in range(63)] == first[57:]
    assert ids(next(r.batches(100, seed=4))) != first[0]
    assert r.meta["model"] == "tiny" and r.d == 16


def test_ranks_split_the_same_sequence(tmp_path):
    write_cache(tmp_path / "c.h5")
    r = ActivationReader(tmp_path / "c.h5", block_rows=256, buffer_blocks=4)
    single = r.batches(64, seed=0)
    seq = [ids(next(single)) for _ in range(20)]
    r0, r1 = r.batches(64, seed=0, rank=0, world_size=2), r.batches(64, seed=0, rank=1, world_size=2)
    assert [ids(next(r0)) for _ in range(10)] == seq[0::2]
    assert [ids(next(r1)) for _ in range(10)] == seq[1::2]


def test_role_filter_and_sequential(tmp_path):
    from interp.cache.format import role_code

    roles = np.where(np.arange(3000) % 3 == 0, role_code("text"), role_code("image_patch"))
    x = write_cache(tmp_path / "c.h5", n=3000, roles=roles)
    r = ActivationReader(tmp_path / "c.h5", roles=("text",), block_rows=100)
    assert r.n_rows == 1000 and len(r.tokens) == 1000
    got = torch.cat([b for _, b in r.iter_sequential(333)])
    assert torch.equal(got, torch.from_numpy(x[::3]))
    assert all(i % 3 == 0 for i in ids(next(r.batches(50))))
    st = ActivationReader(tmp_path / "c.h5").stats()
    assert torch.allclose(st["mean"], torch.from_numpy(x.mean(0)), rtol=1e-4)
    with pytest.raises(CacheError, match=r"unknown roles \['pixels'\]; known: \['image_patch'"):
        ActivationReader(tmp_path / "c.h5", roles=("pixels",))


def test_samples_are_domain_objects_in_the_readers_row_numbering(tmp_path):
    from interp.cache.format import role_code

    roles = np.where(np.arange(3000) % 3 == 0, role_code("text"), role_code("image_patch"))
    x = write_cache(tmp_path / "c.h5", n=3000, roles=roles)
    full, text = ActivationReader(tmp_path / "c.h5"), ActivationReader(tmp_path / "c.h5", roles=("text",))
    s = full.sample(7)
    assert (s.index, s.source_index, s.image_ref, s.prompt) == (7, 7, "shapes:train:7:0", "describe the image .")
    assert (s.start, s.stop, s.n_rows) == (70, 80, 10) and list(s.positions) == list(range(10))
    assert torch.equal(full.sample_activations(s), torch.from_numpy(x[70:80]))
    t = text.sample(7)  # the same sample in a role-filtered reader: only its text rows, in that reader's numbers
    assert t.n_rows == int((np.arange(70, 80) % 3 == 0).sum()) and (t.tokens["role"] == role_code("text")).all()
    assert torch.equal(text.sample_activations(t), torch.from_numpy(x[70:80][np.arange(70, 80) % 3 == 0]))
    assert list(full.sample_of_rows(np.array([0, 9, 10, 2999]))) == [0, 0, 1, 299]
    assert full.image_refs[3] == "shapes:train:3:0" and full.n_samples == 300
    assert full.row_ends()[-1] == 3000 and text.row_ends()[-1] == 1000 and not full.has_images  # widths are 0
    with pytest.raises(CacheError, match=r"sample 300 is out of range: the cache has 300 samples \(valid indices 0..299\)"):
        full.sample(300)


def test_clear_errors(tmp_path):
    with pytest.raises(CacheError, match="no activation cache at .*missing.h5: make one with `interp cache"):
        ActivationReader(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(CacheError, match="is not a readable HDF5 file .*; it may be truncated"):
        ActivationReader(tmp_path / "junk.h5")
    write_cache(tmp_path / "c.h5", n=100)
    with open(tmp_path / "c.h5", "r+b") as f:  # cut the file short, as a kill during a copy would
        f.truncate(2000)
    with pytest.raises(CacheError):
        ActivationReader(tmp_path / "c.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(CacheError, match=r"not an lmmscope activation cache \(format None, expected 'lmmscope.activations/3'\)"):
        ActivationReader(tmp_path / "other.h5")
    write_cache(tmp_path / "nan.h5", n=200, bad_rows=(17, 150))
    with pytest.raises(CacheError, match=r"first rows \[17, 150\]"):
        ActivationReader(tmp_path / "nan.h5").check_finite(chunk_rows=64)
    write_cache(tmp_path / "small.h5", n=50)
    with pytest.raises(CacheError, match=r"batch size 64 is larger than the cache \(50 rows\)"):
        next(ActivationReader(tmp_path / "small.h5").batches(64))
