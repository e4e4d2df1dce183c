"""Sharded caches: an index over shard files reads exactly like the single-file cache it was split from."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from interp.cache.reader import ActivationReader, CacheError
from interp.cache.shards import (ShardError, check_shards, finish_shards, is_sharded, shard_cache, shard_files,
                                 write_index)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_path):
    """A tiny LLaVA cache with image-patch and text rows (24 samples, 68 rows each: 64 patches, 4 text)."""
    from interp.cache.writer import CacheConfig, build_cache

    run = tmp_path_factory.mktemp("shards") / "run"
    return build_cache(CacheConfig(run=str(run), model=str(tiny_path("llava")), layer="1", samples=24, batch_size=8,
                                   part_samples=24, dtype="float32", roles=("image_patch", "text")))


def same_reader(a: ActivationReader, b: ActivationReader) -> None:
    assert (a.n_rows, a.d, a.n_samples) == (b.n_rows, b.d, b.n_samples)
    for k in ("model", "layer", "module_path", "dtype", "roles", "data", "data_fingerprint", "created"):
        assert a.meta.get(k) == b.meta.get(k), k
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.samples_table, b.samples_table)
    for start, stop in ((0, a.n_rows), (5, 17), (a.n_rows - 30, a.n_rows - 1)):
        assert torch.equal(a.read(start, stop), b.read(start, stop))
    for (s1, x1), (s2, x2) in zip(a.iter_sequential(50), b.iter_sequential(50)):
        assert s1 == s2 and torch.equal(x1, x2)
    ga, gb = a.batches(32, seed=3), b.batches(32, seed=3)
    for _ in range(12):  # more than one epoch
        assert torch.equal(next(ga), next(gb))
    for i in (0, 11, a.n_samples - 1):
        sa, sb = a.sample(i), b.sample(i)
        assert (sa.start, sa.stop, sa.image_ref, sa.prompt) == (sb.start, sb.stop, sb.image_ref, sb.prompt)
        assert torch.equal(a.sample_activations(i), b.sample_activations(i))
    sa, sb = a.stats(), b.stats()
    assert torch.equal(sa["mean"], sb["mean"]) and sa["norm"] == sb["norm"]


def test_sharded_cache_reads_as_the_single_file(cache, tmp_path):
    index = shard_cache(cache, tmp_path / "activations.h5", samples_per_shard=7)  # 7, 7, 7, 3 samples
    assert is_sharded(index) and not is_sharded(cache)
    shards = shard_files(index)
    assert [s["samples"] for s in shards] == [7, 7, 7, 3] and sum(s["rows"] for s in shards) == 24 * 68
    with ActivationReader(cache) as single, ActivationReader(index) as sharded:
        same_reader(single, sharded)
    for roles in (("image_patch",), ("text",)):
        with ActivationReader(cache, roles=roles) as single, ActivationReader(index, roles=roles) as sharded:
            assert single.n_rows == sharded.n_rows
            assert torch.equal(single.read(0, single.n_rows), sharded.read(0, sharded.n_rows))
    # each shard is a cache on its own, with its own (local) tables
    with ActivationReader(shards[1]["file"]) as one, ActivationReader(cache) as single:
        s = single.sample(7)
        assert one.n_samples == 7 and one.samples_table["row_start"][0] == 0
        assert torch.equal(one.read(0, s.n_rows), single.read(s.start, s.stop))
        assert one.tokens["sample"].min() == 0
    check_shards(index)
    # the index holds the tables, not the activations; the shards take what the file took
    assert index.stat().st_size < 0.5 * cache.stat().st_size
    shard_bytes = sum(s["file"].stat().st_size for s in shards)
    assert shard_bytes < 1.02 * cache.stat().st_size + 4 * 8192  # plus a few KB of HDF5 headers per shard
    # and an index can be re-sharded (other shard sizes) into another cache that reads the same
    again = shard_cache(index, tmp_path / "again.h5", samples_per_shard=12)
    with ActivationReader(cache) as single, ActivationReader(again) as resharded:
        assert len(shard_files(again)) == 2
        assert torch.equal(single.read(0, single.n_rows), resharded.read(0, resharded.n_rows))


def test_moved_directory_still_reads(cache, tmp_path):
    shard_cache(cache, tmp_path / "a" / "activations.h5", samples_per_shard=10)
    shutil.move(tmp_path / "a", tmp_path / "b")
    with ActivationReader(cache) as single, ActivationReader(tmp_path / "b" / "activations.h5") as moved:
        assert torch.equal(single.read(0, single.n_rows), moved.read(0, moved.n_rows))


def test_missing_or_replaced_shard_is_named(cache, tmp_path):
    index = shard_cache(cache, tmp_path / "activations.h5", samples_per_shard=8)
    files = [s["file"] for s in shard_files(index)]
    files[1].rename(files[1].with_suffix(".gone"))
    with pytest.raises(ShardError, match=r"shard .*shard-000001.h5 is missing"):
        check_shards(index)
    with ActivationReader(index) as r:
        assert torch.isnan(r.read(0, r.n_rows)).any()  # never silent zeros
        with pytest.raises(CacheError, match="hold NaN or Inf"):
            r.check_finite()
    files[1].with_suffix(".gone").rename(files[1])
    with h5py.File(files[2], "r+") as f:  # a shard replaced by one of another size
        a = f["activations"][:]
        del f["activations"]
        f.create_dataset("activations", data=a[:-1])
    with pytest.raises(ShardError, match=r"shard-000002.h5 holds .* the index maps"):
        check_shards(index)


def test_finish_shards_turns_writer_parts_into_shards(cache, tmp_path):
    """The writer's part files (local token sample numbers, row_start 0, no cache attributes) become the
    shards in place; nothing is copied, and re-running it changes nothing."""
    with h5py.File(cache, "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k not in ("d", "n_rows", "n_samples", "skipped")}
        acts, tokens, samples = f["activations"][:], f["tokens"][:], f["samples"][:]
    parts = tmp_path / "activations.h5.parts"
    parts.mkdir()
    for p, s0 in enumerate(range(0, 24, 10)):  # parts of 10, 10, 4 samples, as _write_part writes them
        sm = samples[s0: s0 + 10].copy()
        r0, r1 = sm["row_start"][0], sm["row_start"][-1] + sm["n_rows"][-1]
        t = tokens[r0:r1].copy()
        t["sample"] -= s0
        sm["row_start"] = 0
        with h5py.File(parts / f"part-{p:06d}.h5", "w") as g:
            g.create_dataset("activations", data=acts[r0:r1])
            g.create_dataset("tokens", data=t)
            g.create_dataset("samples", data=sm)
            g.attrs["skipped"] = json.dumps([{"image_ref": "x", "error": "bad"}] if p == 1 else [])
    out = tmp_path / "activations.h5"
    for _ in range(2):
        finish_shards(parts, 3, out, attrs)
        with ActivationReader(cache) as single, ActivationReader(out) as sharded:
            same_reader(single, sharded)
            assert json.loads(sharded.meta["skipped"] if isinstance(sharded.meta["skipped"], str)
                              else json.dumps(sharded.meta["skipped"])) == [{"image_ref": "x", "error": "bad"}]
    with pytest.raises(ShardError, match=r"parts \['part-000003.h5'\] are missing"):
        finish_shards(parts, 4, out, attrs)


def test_shards_of_different_widths_are_refused(cache, tmp_path):
    index = shard_cache(cache, tmp_path / "activations.h5", samples_per_shard=12)
    files = [s["file"] for s in shard_files(index)]
    with h5py.File(files[1], "r+") as f:
        a = f["activations"][:]
        del f["activations"]
        f.create_dataset("activations", data=a[:, :-1])
    with pytest.raises(ShardError, match="different widths"):
        write_index(files, tmp_path / "again.h5", {})


def test_features_of_a_sharded_cache_equal_the_single_files(cache, tmp_path):
    """A stage reads a sharded cache without knowing it: features over the index equal those over the file."""
    from explain.features import FeaturesConfig, compute_features
    from interp.infra.layout import RunLayout
    from saes.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=32, d_sae=64, k=8))
    outs = []
    for name, make in (("single", lambda p: shutil.copy(cache, p)),
                       ("sharded", lambda p: shard_cache(cache, p, samples_per_shard=5))):
        layout = RunLayout.of(tmp_path / name).mkdir()
        make(layout.cache)
        sae.save(layout.sae)
        outs.append(compute_features(FeaturesConfig(run=str(layout.root), device="cpu", progress=False)))
    with h5py.File(outs[0]) as a, h5py.File(outs[1]) as b:
        for name in ("stats/n_active", "stats/max", "top_max/sample" if "top_max/sample" in a else "top_max/image"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
