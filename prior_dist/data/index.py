"""Where a split's samples are: sources, the split index, the epoch order and the batch plan.

A source is a prepared shard directory (or a URL prefix for streaming) with a weight; the
split index lists every sample of one split over all sources with its shard and the byte
offsets of its members (the consolidated, memory-mapped index of `prior_dist.data.compact`).
The epoch order is a permutation of sample ids drawn from (seed, epoch) only; the batch plan
cuts it into global batches and gives each (batch index, rank) its positions. See
`prior_dist.data.loader` for the rule these serve.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from prior_dist.data.compact import CompactIndex, compact_name, load_compact
from prior_dist.data.shards import load_manifest
from prior_dist.data.transforms import CorruptSample, sample_rng

Mode = Literal["indexed", "stream", "resampled"]
LastBatch = Literal["uneven", "drop"]
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


@dataclass
class ShardSource:
    """One prepared dataset: a local directory with manifest.json, or a URL prefix for streaming."""

    location: str
    weight: float = 1.0
    manifest_dir: str | None = None  # where manifest.json lives when `location` is remote

    @property
    def remote(self) -> bool:
        return self.location.startswith(_REMOTE_PREFIXES)


def parse_sources(data) -> list[ShardSource]:
    """`DIR`, `DIR:WEIGHT`, a list of those, or ShardSource objects."""
    items = data if isinstance(data, (list, tuple)) else [data]
    sources = []
    for item in items:
        if isinstance(item, ShardSource):
            sources.append(item)
            continue
        text = str(item)
        location, weight = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head and not text.startswith(_REMOTE_PREFIXES):
            try:
                weight = float(tail)
                location = head
            except ValueError:
                pass
        if weight <= 0:
            raise ValueError(f"data source {text!r}: weight must be > 0")
        sources.append(ShardSource(location, weight))
    return sources


class SplitIndex:
    """Every sample of one split over several sources: its shard, key and member offsets.

    Per source, the split's consolidated index (`prior_dist.data.compact`), memory-mapped: the
    cost per sample is a few shared pages, not Python objects in every process. Sample ids run
    over the sources in order. Without offsets (stream mode) only the shard list is read.
    """

    def __init__(self, sources: list[ShardSource], split: str, need_offsets: bool = True):
        self.sources = sources
        self.split = split
        self.shards: list[dict] = []  # {"url", "num_samples", "size_bytes", "source"}
        self.source_sizes: list[int] = []
        self.parts: list[CompactIndex] = []
        self._starts = [0]  # first sample id of each source
        self._shard_base: list[int] = []  # first shard id of each source
        for source_id, source in enumerate(sources):
            manifest_dir = source.manifest_dir or source.location
            manifest = load_manifest(manifest_dir)
            if split not in manifest["splits"]:
                raise ValueError(
                    f"{manifest_dir}: no split {split!r}; it has {sorted(manifest['splits'])}"
                )
            shards = manifest["splits"][split]["shards"]
            self._shard_base.append(len(self.shards))
            for shard in shards:
                url = f"{source.location.rstrip('/')}/{shard['file']}"
                self.shards.append(
                    {
                        "url": url,
                        "num_samples": shard["num_samples"],
                        "size_bytes": shard.get("size_bytes"),
                        "source": source_id,
                    }
                )
            count = sum(shard["num_samples"] for shard in shards)
            if need_offsets:
                part = load_compact(manifest_dir, split, shards)
                if len(part) != count:
                    raise ValueError(
                        f"{manifest_dir}: {compact_name(split)} has {len(part)} samples, the "
                        f"manifest {count} (rebuild: python -m prior_dist.shardify reindex DIR)"
                    )
                self.parts.append(part)
            self.source_sizes.append(count)
            self._starts.append(self._starts[-1] + count)

    def __len__(self) -> int:
        return self._starts[-1]

    def epoch_length(self) -> int:
        """Samples in one epoch of the weighted mixture (weight 1: each sample once)."""
        return sum(int(round(s.weight * n)) for s, n in zip(self.sources, self.source_sizes))

    def _locate(self, sample_id: int) -> tuple[int, int]:
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample id {sample_id} outside [0, {len(self)})")
        source = bisect.bisect_right(self._starts, sample_id) - 1
        return source, sample_id - self._starts[source]

    def key(self, sample_id: int) -> str:
        source, local = self._locate(sample_id)
        return self.parts[source].key(local)

    def shard_of(self, sample_id: int) -> dict:
        source, local = self._locate(sample_id)
        return self.shards[self._shard_base[source] + int(self.parts[source].shard[local])]

    def member_spans(self, sample_id: int) -> dict[str, tuple[int, int]]:
        """`{extension: (offset, size)}` of the sample's members in its shard."""
        source, local = self._locate(sample_id)
        return self.parts[source].spans(local)


def epoch_order(
    index: SplitIndex,
    seed: int,
    epoch: int,
    shuffle: bool,
    mode: Mode = "indexed",
    samples_per_epoch: int | None = None,
) -> np.ndarray:
    """The epoch's sequence of sample ids (a function of seed and epoch only)."""
    rng = sample_rng(seed, epoch, "__epoch_order__")
    if mode == "resampled":
        total = samples_per_epoch or len(index)
        weights = np.concatenate(
            [np.full(n, s.weight / n) for s, n in zip(index.sources, index.source_sizes) if n]
        )
        return rng.choice(len(index), size=total, replace=True, p=weights / weights.sum())
    parts, offset = [], 0
    # int32 ids where they fit: half the memory, and the same permutations as int64 ones.
    dtype = np.int32 if len(index) < 2**31 else np.int64
    for source_id, (source, size) in enumerate(zip(index.sources, index.source_sizes)):
        wanted = int(round(source.weight * size))
        ids = np.arange(offset, offset + size, dtype=dtype)
        offset += size
        if size == 0 or wanted == 0:
            continue
        passes = -(-wanted // size)
        chosen = []
        for p in range(passes):
            src_rng = sample_rng(seed, epoch, f"__source_{source_id}_{p}__")
            chosen.append(src_rng.permutation(ids) if shuffle else ids)
        parts.append(np.concatenate(chosen)[:wanted])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return rng.permutation(order) if shuffle else order


class BatchPlan:
    """Which positions of the epoch order each (batch index, rank) takes: batch index t of an
    epoch is its t-th global batch (one micro-batch on every rank)."""

    def __init__(
        self, num_samples: int, micro_batch_size: int, world_size: int, last_batch: LastBatch
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if last_batch not in ("uneven", "drop"):
            raise ValueError(f"last_batch must be 'uneven' or 'drop', got {last_batch!r}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.global_batch = micro_batch_size * world_size
        full, rest = divmod(num_samples, self.global_batch)
        self.num_batches = full + (1 if rest and last_batch == "uneven" else 0)

    def rank_slice(self, batch_index: int, rank: int) -> tuple[int, int]:
        start = batch_index * self.global_batch
        size = min(self.global_batch, self.num_samples - start)
        if size == self.global_batch:
            return start + rank * self.micro_batch_size, start + (rank + 1) * self.micro_batch_size
        return start + (rank * size) // self.world_size, start + (
            (rank + 1) * size
        ) // self.world_size


class ShardReader:
    """Reads samples' members from local shard files by offset. Files stay open (up to `limit`);
    reads use `os.pread`, which moves no shared file offset, so a reader opened before the
    DataLoader forks its workers stays correct in every one of them."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.handles: dict[str, tuple[int, int]] = {}  # path -> (fd, size at open)

    def read(self, path: str, offset: int, size: int) -> bytes:
        if path not in self.handles:
            if len(self.handles) >= self.limit:
                os.close(self.handles.pop(next(iter(self.handles)))[0])
            fd = os.open(path, os.O_RDONLY)
            self.handles[path] = fd, os.fstat(fd).st_size
        fd, file_size = self.handles[path]
        if offset + size > file_size:  # also keeps a huge `size` from being read
            raise CorruptSample(
                f"{path}: truncated (wanted {size} bytes at offset {offset}, the file has "
                f"{file_size})"
            )
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise CorruptSample(
                f"{path}: truncated (wanted {size} bytes at offset {offset}, got {len(data)})"
            )
        return data

    def members(self, index: SplitIndex, sample_id: int) -> dict[str, bytes]:
        """`{extension: bytes}` of one sample of `index`."""
        url = index.shard_of(sample_id)["url"]
        return {
            ext: self.read(url, offset, size)
            for ext, (offset, size) in index.member_spans(sample_id).items()
        }

    def __del__(self) -> None:
        for fd, _ in self.handles.values():
            try:
                os.close(fd)
            except OSError:
                pass
