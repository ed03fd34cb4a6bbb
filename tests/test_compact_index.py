"""The consolidated, memory-mapped split index (`prior_dist.data.compact`)."""

import json
import mmap
import subprocess
import sys
import time

import numpy as np
import pytest

from prior_dist.data.compact import compact_name, open_compact, shards_digest
from prior_dist.data.index import ShardReader, ShardSource, SplitIndex
from prior_dist.data.shards import load_index, load_manifest
from prior_dist.preparation.build import verify
from tests.conftest import REPO


def json_entries(directory, split):
    """(shard position, key, members) of every sample, read the old way: each `.idx.json`."""
    shards = load_manifest(directory)["splits"][split]["shards"]
    return [
        (i, s["key"], {ext: tuple(span) for ext, span in s["members"].items()})
        for i, shard in enumerate(shards)
        for s in load_index(directory, shard["name"])["samples"]
    ]


def assert_matches_json(index: SplitIndex, directory, split="train"):
    entries = json_entries(directory, split)
    assert len(index) == len(entries)
    for sample_id, (shard, key, members) in enumerate(entries):
        assert index.key(sample_id) == key
        assert index.member_spans(sample_id) == members
        assert index.shard_of(sample_id) is index.shards[shard]


def test_shardify_writes_it_and_the_loader_maps_it(phantom_dir):
    for split in ("train", "validate", "test"):
        assert (phantom_dir / compact_name(split)).is_file()
        index = SplitIndex([ShardSource(str(phantom_dir))], split)
        assert_matches_json(index, phantom_dir, split)
        part = index.parts[0]
        # Read-only views of one file mapping: shared pages, nothing parsed per sample.
        for array in part.arrays().values():
            base = array
            while isinstance(base, np.ndarray):
                base = base.base
            assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)
            assert not array.flags.writeable
    # Member types are the union over the split; a sample without one (a single-view study
    # among two-view ones) has no span for it.
    index = SplitIndex([ShardSource(str(phantom_dir))], "train")
    kinds = {frozenset(index.member_spans(i)) for i in range(len(index))}
    assert len(kinds) == 2 and set().union(*kinds) == set(index.parts[0].exts)


def test_two_sources_number_samples_in_order(phantom_dir, tmp_path):
    index = SplitIndex([ShardSource(str(phantom_dir)), ShardSource(str(phantom_dir), 2.0)], "test")
    n = len(index) // 2
    assert index.epoch_length() == 3 * n
    for i in range(n):
        assert index.key(i) == index.key(n + i)
        assert index.member_spans(i) == index.member_spans(n + i)
        assert index.shard_of(n + i)["source"] == 1
    reader = ShardReader()
    assert reader.members(index, 0) == reader.members(index, n)
    with pytest.raises(IndexError, match="outside"):
        index.key(2 * n)


def test_missing_stale_and_damaged_indexes_are_rebuilt(phantom_copy, capfd):
    path = phantom_copy / compact_name("train")
    good = path.read_bytes()
    path.unlink()
    assert_matches_json(SplitIndex([ShardSource(str(phantom_copy))], "train"), phantom_copy)
    assert "missing; building it" in capfd.readouterr().err
    assert path.read_bytes() == good  # built on first use: the same bytes shardify wrote

    path.write_bytes(good[: len(good) // 2])  # cut short
    assert_matches_json(SplitIndex([ShardSource(str(phantom_copy))], "train"), phantom_copy)
    assert "unreadable" in capfd.readouterr().err and path.read_bytes() == good

    # The manifest's shard list changes (a shard dropped): the old index is stale.
    manifest = json.loads((phantom_copy / "manifest.json").read_text())
    dropped = manifest["splits"]["train"]["shards"].pop()
    (phantom_copy / "manifest.json").write_text(json.dumps(manifest))
    index = SplitIndex([ShardSource(str(phantom_copy))], "train")
    assert "stale" in capfd.readouterr().err
    assert len(index) == len(json_entries(phantom_copy, "train"))
    assert open_compact(path).digest == shards_digest(manifest["splits"]["train"]["shards"])
    assert dropped["num_samples"] > 0 and path.read_bytes() != good


def test_an_index_that_cannot_be_written_stays_in_memory(phantom_copy, capfd):
    # Root writes into read-only directories, so the place is taken by a directory instead.
    path = phantom_copy / compact_name("train")
    path.unlink()
    path.mkdir()
    index = SplitIndex([ShardSource(str(phantom_copy))], "train")
    assert_matches_json(index, phantom_copy)
    assert "could not be written" in capfd.readouterr().err
    assert path.is_dir() and not list(path.iterdir())
    assert not [p for p in phantom_copy.iterdir() if ".tmp." in p.name]


def index_only_dataset(directory, shards: int, per_shard: int) -> None:
    """A manifest and `.idx.json` files with no tars behind them: enough to build an index."""
    directory.mkdir()
    entries = []
    for i in range(shards):
        name = f"train-{i:06d}"
        samples = [
            {"key": f"s{i}_{j}", "members": {"jpg": [512 + 2048 * j, 1000], "json": [1536, 90]}}
            for j in range(per_shard)
        ]
        (directory / f"{name}.idx.json").write_text(json.dumps({"samples": samples}))
        entries.append({"name": name, "file": f"{name}.tar", "num_samples": per_shard})
    manifest = {"format": "prior_dist-shards", "splits": {"train": {"shards": entries}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_ranks_starting_together_build_the_index_once(tmp_path):
    """Four processes released at once on a split with no index (large enough to take a
    while to build): one builds it, the others wait for the lock and map what it wrote."""
    data = tmp_path / "data"
    index_only_dataset(data, shards=40, per_shard=5000)
    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from prior_dist.data.index import ShardSource, SplitIndex\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready-' + sys.argv[1]), 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        f"print(len(SplitIndex([ShardSource({str(data)!r})], 'train')))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        time.sleep(0.05)
    go.touch()  # all four are polling: released together
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outputs]
    assert [int(o) for o, _ in outputs] == [200_000] * 4
    assert sum("building it" in e for _, e in outputs) == 1, [e for _, e in outputs]


def test_verify_names_a_tampered_index_and_reindex_mends_it(phantom_copy):
    path = phantom_copy / compact_name("test")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the key blob
    path.write_bytes(bytes(data))
    problems = verify(phantom_copy)
    assert problems == [
        f"{path}: index contents do not match their checksum (rebuild: shardify reindex)"
    ]
    out = subprocess.run(
        [sys.executable, "-m", "prior_dist.shardify", "reindex", str(phantom_copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    counts = json.loads(out.stdout)
    assert counts == {s: e["num_samples"] for s, e in load_manifest(phantom_copy)["splits"].items()}
    assert verify(phantom_copy) == []


def test_epoch_order_is_int32_and_unchanged(phantom_dir):
    from prior_dist.data.index import epoch_order

    index = SplitIndex([ShardSource(str(phantom_dir)), ShardSource(str(phantom_dir), 1.5)], "train")
    order = epoch_order(index, seed=7, epoch=2, shuffle=True)
    assert order.dtype == np.int32
    # The same draws as int64 ids gave: int32 only changes the storage.
    from prior_dist.data.transforms import sample_rng

    n = index.source_sizes[0]
    first = sample_rng(7, 2, "__source_0_0__").permutation(np.arange(n))
    second = [
        sample_rng(7, 2, f"__source_1_{p}__").permutation(np.arange(n, 2 * n)) for p in (0, 1)
    ]
    expected = np.concatenate([first, np.concatenate(second)[: int(round(1.5 * n))]])
    np.testing.assert_array_equal(order, sample_rng(7, 2, "__epoch_order__").permutation(expected))
