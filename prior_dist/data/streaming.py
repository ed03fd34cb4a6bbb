"""Stream mode: sources that cannot seek (`pipe:` commands, http/https) read in shard order.

Each (rank, worker) reads a contiguous range of the epoch's shard-order concatenation, skipping
into its first shard, so every sample is still served exactly once per epoch and every rank
yields the same number of batches; the batches then depend on the world size and the number of
workers.

Object-store shards (s3://, gs://) are downloaded whole into a spooled temporary file (memory
up to `SPOOL_IN_MEMORY`, then local disk) before they are read, the next `prefetch` ones in a
background thread while the current one is parsed. A transfer that fails (a dropped connection,
a timeout, a short read) is resumed from the byte it had reached, after a backoff that doubles
from `backoff_s` up to 30 s, at most `retries` times per shard; each retry is counted
(`PriorLoader.io_retries`). Only a shard still failing after that loses its remaining samples,
counted as skipped with the reason.
"""

from __future__ import annotations

import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from torch.utils.data import IterableDataset, get_worker_info

from prior_dist.data.index import SplitIndex
from prior_dist.data.shards import OBJECT_STORES, open_object
from prior_dist.data.transforms import CorruptSample, SampleTransform, sample_rng

SPOOL_IN_MEMORY = 256 << 20
_CHUNK = 8 << 20
_MAX_BACKOFF_S = 30.0


class ShardFetchError(OSError):
    """An object-store shard that could not be read after every retry."""


def fetch_shard(
    url: str, size: int | None, retries: int, backoff_s: float
) -> tuple[tempfile.SpooledTemporaryFile, int]:
    """(a file holding the whole shard, positioned at 0; the retries it took). A failed transfer
    resumes where it stopped; a missing or forbidden object is not retried."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    attempt = 0
    while True:
        try:
            with open_object(url) as handle:
                if spool.tell():
                    handle.seek(spool.tell())
                while block := handle.read(_CHUNK):
                    spool.write(block)
            if size is not None and spool.tell() != size:
                raise OSError(f"short read: {spool.tell()} of {size} bytes")
            spool.seek(0)
            return spool, attempt
        except (FileNotFoundError, PermissionError):
            spool.close()
            raise
        except Exception as exc:  # noqa: BLE001 - any transport error is worth a retry
            if attempt >= retries:
                spool.close()
                raise ShardFetchError(f"{url}: {exc} (after {retries} retries)") from exc
            if size is not None and spool.tell() > size:
                spool.seek(0)
                spool.truncate()
            attempt += 1
            time.sleep(min(backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))


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
        retries: int = 6,
        backoff_s: float = 1.0,
        prefetch: int = 1,
    ):
        self.index, self.rank, self.world_size = index, rank, world_size
        self.transform, self.seed, self.shuffle, self.chunk = transform, seed, shuffle, chunk
        if retries < 0 or prefetch < 0 or backoff_s < 0:
            raise ValueError(
                f"io_retries, prefetch_shards and io_backoff_s must be >= 0, got {retries}, "
                f"{prefetch}, {backoff_s}"
            )
        self.retries, self.backoff_s, self.prefetch = retries, backoff_s, prefetch
        self.epoch = 0
        self.skip_per_worker: list[int] = []
        self._retries_seen = 0  # retries not yet reported with an item

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

    def _wanted(self, shard_ids: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
        """(shard id, first, last) sample positions of each shard overlapping [start, end)."""
        out, position = [], 0
        for shard_id in shard_ids:
            count = self.index.shards[shard_id]["num_samples"]
            if position + count > start and position < end:
                out.append((shard_id, max(start - position, 0), min(end - position, count)))
            position += count
            if position >= end:
                break
        return out

    def _open(self, shard_id: int, pending: dict[int, Future]):
        """The shard as a readable stream: fetched ahead for object stores, else opened."""
        shard = self.index.shards[shard_id]
        if shard_id in pending:
            spool, retries = pending.pop(shard_id).result()
            self._retries_seen += retries
            return spool
        # webdataset is needed only in stream mode, for sources that cannot seek.
        import webdataset as wds

        return wds.gopen(shard["url"], "rb")

    def _stream(
        self, shard_ids: list[int], start: int, end: int
    ) -> Iterator[tuple[str, dict | None]]:
        wanted = self._wanted(shard_ids, start, end)
        remote = [w for w in wanted if self.index.shards[w[0]]["url"].startswith(OBJECT_STORES)]
        pending: dict[int, Future] = {}
        pool = ThreadPoolExecutor(max_workers=1)

        def ahead(done: int) -> None:
            for shard_id, _, _ in remote[done : done + 1 + self.prefetch]:
                if shard_id not in pending:
                    shard = self.index.shards[shard_id]
                    pending[shard_id] = pool.submit(
                        fetch_shard,
                        shard["url"],
                        shard.get("size_bytes"),
                        self.retries,
                        self.backoff_s,
                    )

        done = 0
        try:
            for shard_id, first, last in wanted:
                ahead(done)
                done += shard_id in pending
                yield from self._read_shard(shard_id, first, last, pending)
        finally:
            # A reader closed early (the end of a resumed range, a stopped run) does not wait
            # for a shard it fetched ahead.
            pool.shutdown(wait=False, cancel_futures=True)

    def _read_shard(
        self, shard_id: int, first: int, last: int, pending: dict[int, Future]
    ) -> Iterator[tuple[str, dict | None]]:
        """Samples [first, last) of one shard; those it cannot read come as (where, None)."""
        shard = self.index.shards[shard_id]
        seen, reason = 0, "unreadable shard data"
        try:
            stream = self._open(shard_id, pending)
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
        except (tarfile.TarError, OSError, EOFError) as exc:
            reason = str(exc)
        # A truncated or unreadable shard: its missing samples are counted as skipped, so
        # every rank still consumes exactly its share and stays in step.
        for _ in range(max(last - max(seen, first), 0)):
            yield f"{shard['url']}#{seen} ({reason})", None
            seen += 1

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
        item = {"worker": worker, "sample": None, "error": None, "retries": self._retries_seen}
        self._retries_seen = 0
        if members is None:
            item["error"] = f"{key}: sample not read"
            return item
        try:
            item["sample"] = self.transform(key, members, epoch)
        except CorruptSample as exc:
            item["error"] = str(exc)
        return item
