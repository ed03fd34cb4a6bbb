"""Stream mode: sources that cannot seek (`pipe:` commands, http/https) read in shard order.

Each (rank, worker) reads a contiguous range of the epoch's shard-order concatenation, skipping
into its first shard, so every sample is still served exactly once per epoch and every rank
yields the same number of batches; the batches then depend on the world size and the number of
workers.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from prior_dist.data.index import SplitIndex
from prior_dist.data.shards import OBJECT_STORES, open_object
from prior_dist.data.transforms import CorruptSample, SampleTransform, sample_rng


class StreamSamples(IterableDataset):
    """Stream mode: each (rank, worker) reads a contiguous range of the epoch's shard sequence."""

    def __init__(
        self,
        index: SplitIndex,
        rank: int,
        world_size: int,
        transform: SampleTransform,
        seed: int,
        shuffle: bool,
        chunk: int = 256,
    ):
        self.index, self.rank, self.world_size = index, rank, world_size
        self.transform, self.seed, self.shuffle, self.chunk = transform, seed, shuffle, chunk
        self.epoch = 0
        self.skip_per_worker: list[int] = []

    def worker_range(self, epoch: int, worker: int, num_workers: int) -> tuple[list[int], int, int]:
        rng = sample_rng(self.seed, epoch, "__shard_order__")
        shard_ids = (
            list(rng.permutation(len(self.index.shards)))
            if self.shuffle
            else list(range(len(self.index.shards)))
        )
        total = len(self.index)
        r0, r1 = self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size
        n = r1 - r0
        w0, w1 = r0 + worker * n // num_workers, r0 + (worker + 1) * n // num_workers
        return shard_ids, w0, w1

    def _stream(
        self, shard_ids: list[int], start: int, end: int
    ) -> Iterator[tuple[str, dict | None]]:
        # webdataset is needed only in stream mode, for sources that cannot seek.
        import webdataset as wds

        position = 0
        for shard_id in shard_ids:
            shard = self.index.shards[shard_id]
            count = shard["num_samples"]
            if position + count <= start:
                position += count
                continue
            if position >= end:
                return
            first = max(start - position, 0)
            last = min(end - position, count)
            seen = 0
            try:
                url = shard["url"]
                stream = open_object(url) if url.startswith(OBJECT_STORES) else wds.gopen(url, "rb")
                try:
                    with tarfile.open(fileobj=stream, mode="r|") as tar:
                        current, members = None, {}
                        for member in tar:
                            if not member.isfile():
                                continue
                            key, _, ext = member.name.partition(".")
                            if key != current:
                                if current is not None:
                                    if seen >= first:
                                        yield current, members
                                    seen += 1
                                    if seen >= last:
                                        break
                                current, members = key, {}
                            if seen >= first:
                                members[ext] = tar.extractfile(member).read()
                        else:
                            if current is not None and first <= seen < last:
                                yield current, members
                                seen += 1
                finally:
                    stream.close()
            except (tarfile.TarError, OSError, EOFError):
                pass
            # A truncated or unreadable shard: its missing samples are counted as skipped, so
            # every rank still consumes exactly its share and stays in step.
            for _ in range(max(last - max(seen, first), 0)):
                yield f"{shard['url']}#{seen}", None
                seen += 1
            position += count

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        shard_ids, start, end = self.worker_range(epoch, worker, num_workers)
        skip = self.skip_per_worker[worker] if worker < len(self.skip_per_worker) else 0
        # Deterministic chunk shuffle: positions are permuted within chunks of `chunk`, so a
        # resume re-reads only the chunk it stopped in.
        buffer: list[tuple[str, dict | None]] = []

        def flush():
            nonlocal chunk_index
            order = (
                sample_rng(
                    self.seed, epoch, f"__chunk_{self.rank}_{worker}_{chunk_index}__"
                ).permutation(len(buffer))
                if self.shuffle
                else range(len(buffer))
            )
            chunk_index += 1
            out = [buffer[i] for i in order]
            buffer.clear()
            return out

        chunk_start = (skip // self.chunk) * self.chunk
        chunk_index = skip // self.chunk
        produced = chunk_start
        for item in self._stream(shard_ids, start + chunk_start, end):
            buffer.append(item)
            if len(buffer) == self.chunk:
                for key, members in flush():
                    if produced >= skip:
                        yield self._process(worker, key, members, epoch)
                    produced += 1
        for key, members in flush():
            if produced >= skip:
                yield self._process(worker, key, members, epoch)
            produced += 1

    def _process(self, worker: int, key: str, members: dict | None, epoch: int) -> dict:
        if members is None:
            return {"worker": worker, "sample": None, "error": f"{key}: unreadable shard data"}
        try:
            return {"worker": worker, "sample": self.transform(key, members, epoch), "error": None}
        except CorruptSample as exc:
            return {"worker": worker, "sample": None, "error": str(exc)}
