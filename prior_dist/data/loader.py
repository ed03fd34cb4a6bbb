"""The exactly-once, world-size-independent, resumable loader.

The rule (indexed mode, the default for local shards): one epoch is a permutation of every
sample id, drawn from (seed, epoch) only. Global step t covers positions [t*G, (t+1)*G) of that
permutation, G = micro_batch * world_size, and rank r takes the r-th block of B of them. So
every sample is served exactly once per epoch, every rank yields the same number of batches,
and 2 ranks of micro-batch B see, step by step, exactly the samples of 1 rank of micro-batch 2B.
Samples are read by byte offset (the `.idx.json` written by shardify), so any rank or worker
can serve any sample; batches are built whole inside DataLoader workers.

The last, partial global batch (N not a multiple of G): `last_batch="uneven"` (default) splits
it as evenly as possible over ranks (sizes differ by at most one, possibly zero), so nothing is
dropped; `"drop"` leaves it out. Either way all ranks yield the same number of batches.

Stream mode (`pipe:` commands, http/https: sources that cannot seek) keeps exactly-once and
equal batch counts (each rank streams a contiguous range of the epoch's shard-order
concatenation, skipping into its first shard), but the batches then depend on the world size
and the number of workers. Resampled mode draws every epoch's samples with replacement.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from prior_dist.data.shards import load_index, load_manifest
from prior_dist.data.transforms import CorruptSample, SampleTransform, collate, sample_rng

Mode = Literal["indexed", "stream", "resampled"]
LastBatch = Literal["uneven", "drop"]
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


@dataclass
class Source:
    """One prepared dataset: a local directory with manifest.json, or a URL prefix for streaming."""

    location: str
    weight: float = 1.0
    manifest_dir: str | None = None  # where manifest.json lives when `location` is remote

    @property
    def remote(self) -> bool:
        return self.location.startswith(_REMOTE_PREFIXES)


def parse_sources(data) -> list[Source]:
    """`DIR`, `DIR:WEIGHT`, a list of those, or Source objects."""
    items = data if isinstance(data, (list, tuple)) else [data]
    sources = []
    for item in items:
        if isinstance(item, Source):
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
        sources.append(Source(location, weight))
    return sources


class SplitIndex:
    """Every sample of one split over several sources: shard, key and member offsets."""

    def __init__(self, sources: list[Source], split: str, need_offsets: bool = True):
        self.sources = sources
        self.split = split
        self.shards: list[dict] = []  # {"url", "num_samples", "source"}
        self.sample_shard: list[int] = []
        self.sample_pos: list[int] = []
        self.sample_source: list[int] = []
        self.keys: list[str] = []
        self.members: list[dict] = []
        self.source_sizes: list[int] = []
        for source_id, source in enumerate(sources):
            manifest_dir = source.manifest_dir or source.location
            manifest = load_manifest(manifest_dir)
            if split not in manifest["splits"]:
                raise ValueError(f"{manifest_dir}: no split {split!r}; it has {sorted(manifest['splits'])}")
            count = 0
            for shard in manifest["splits"][split]["shards"]:
                shard_id = len(self.shards)
                url = f"{source.location.rstrip('/')}/{shard['file']}"
                self.shards.append({"url": url, "num_samples": shard["num_samples"], "source": source_id})
                if need_offsets:
                    index = load_index(manifest_dir, shard["name"])
                    for pos, entry in enumerate(index["samples"]):
                        self.sample_shard.append(shard_id)
                        self.sample_pos.append(pos)
                        self.sample_source.append(source_id)
                        self.keys.append(entry["key"])
                        self.members.append(entry["members"])
                count += shard["num_samples"]
            self.source_sizes.append(count)

    def __len__(self) -> int:
        return sum(self.source_sizes)

    def epoch_length(self) -> int:
        """Samples in one epoch of the weighted mixture (weight 1: each sample once)."""
        return sum(int(round(s.weight * n)) for s, n in zip(self.sources, self.source_sizes))


def epoch_order(index: SplitIndex, seed: int, epoch: int, shuffle: bool, mode: Mode = "indexed",
                samples_per_epoch: int | None = None) -> np.ndarray:
    """The epoch's sequence of sample ids (a function of seed and epoch only)."""
    rng = sample_rng(seed, epoch, "__epoch_order__")
    if mode == "resampled":
        total = samples_per_epoch or len(index)
        weights = np.concatenate([np.full(n, s.weight / n) for s, n in zip(index.sources, index.source_sizes) if n])
        return rng.choice(len(index), size=total, replace=True, p=weights / weights.sum())
    parts, offset = [], 0
    for source_id, (source, size) in enumerate(zip(index.sources, index.source_sizes)):
        wanted = int(round(source.weight * size))
        ids = np.arange(offset, offset + size)
        offset += size
        if size == 0 or wanted == 0:
            continue
        passes = -(-wanted // size)
        chosen = []
        for p in range(passes):
            src_rng = sample_rng(seed, epoch, f"__source_{source_id}_{p}__")
            chosen.append(src_rng.permutation(ids) if shuffle else ids)
        parts.append(np.concatenate(chosen)[:wanted])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return rng.permutation(order) if shuffle else order


class BatchPlan:
    """Which positions of the epoch order each (step, rank) takes."""

    def __init__(self, num_samples: int, micro_batch_size: int, world_size: int, last_batch: LastBatch):
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
        self.num_steps = full + (1 if rest and last_batch == "uneven" else 0)

    def rank_slice(self, step: int, rank: int) -> tuple[int, int]:
        start = step * self.global_batch
        size = min(self.global_batch, self.num_samples - start)
        if size == self.global_batch:
            return start + rank * self.micro_batch_size, start + (rank + 1) * self.micro_batch_size
        return start + (rank * size) // self.world_size, start + ((rank + 1) * size) // self.world_size


class _FileCache:
    """Open local shard files, kept per worker process."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.handles: dict[str, object] = {}

    def read(self, path: str, offset: int, size: int) -> bytes:
        handle = self.handles.get(path)
        if handle is None:
            if len(self.handles) >= self.limit:
                self.handles.pop(next(iter(self.handles))).close()
            handle = self.handles[path] = open(path, "rb")
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise CorruptSample(f"{path}: truncated (wanted {size} bytes at offset {offset}, got {len(data)})")
        return data


class IndexedBatches(Dataset):
    """Map-style dataset of whole batches, indexed by (epoch, step): any worker builds any batch."""

    def __init__(self, index: SplitIndex, plan: BatchPlan, rank: int, transform: SampleTransform,
                 seed: int, shuffle: bool, mode: Mode, samples_per_epoch: int | None, pad_token_id: int):
        self.index, self.plan, self.rank = index, plan, rank
        self.transform, self.seed, self.shuffle = transform, seed, shuffle
        self.mode, self.samples_per_epoch = mode, samples_per_epoch
        self.pad_token_id = pad_token_id
        self._order_epoch, self._order = None, None
        self._files = _FileCache()

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(self.index, self.seed, epoch, self.shuffle, self.mode, self.samples_per_epoch)
            self._order_epoch = epoch
        return self._order

    def __len__(self) -> int:
        return self.plan.num_steps

    def load(self, sample_id: int, epoch: int) -> dict:
        shard = self.index.shards[self.index.sample_shard[sample_id]]
        key = self.index.keys[sample_id]
        try:
            members = {ext: self._files.read(shard["url"], off, size)
                       for ext, (off, size) in self.index.members[sample_id].items()}
        except OSError as exc:
            raise CorruptSample(f"{shard['url']}: {key}: {exc}") from exc
        return self.transform(key, members, epoch)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, step = item
        start, end = self.plan.rank_slice(step, self.rank)
        samples, skipped = [], []
        for sample_id in self.order(epoch)[start:end]:
            try:
                samples.append(self.load(int(sample_id), epoch))
            except CorruptSample as exc:
                skipped.append(str(exc))
        cfg = self.transform.config
        labels = len(self.transform.label_names) if self.transform.label_names else None
        batch = collate(samples, self.pad_token_id, cfg.image_size, labels)
        batch.update({"epoch": epoch, "step": step, "skipped": skipped})
        return batch


class _StepSampler(Sampler):
    def __init__(self, epoch: int, start: int, stop: int):
        self.epoch, self.start, self.stop = epoch, start, stop

    def __iter__(self):
        return ((self.epoch, s) for s in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _identity(x):
    return x


class StreamSamples(IterableDataset):
    """Stream mode: each (rank, worker) reads a contiguous range of the epoch's shard sequence."""

    def __init__(self, index: SplitIndex, rank: int, world_size: int, transform: SampleTransform,
                 seed: int, shuffle: bool, chunk: int = 256):
        self.index, self.rank, self.world_size = index, rank, world_size
        self.transform, self.seed, self.shuffle, self.chunk = transform, seed, shuffle, chunk
        self.epoch = 0
        self.skip_per_worker: list[int] = []

    def worker_range(self, epoch: int, worker: int, num_workers: int) -> tuple[list[int], int, int]:
        rng = sample_rng(self.seed, epoch, "__shard_order__")
        shard_ids = list(rng.permutation(len(self.index.shards))) if self.shuffle else list(range(len(self.index.shards)))
        total = len(self.index)
        r0, r1 = self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size
        n = r1 - r0
        w0, w1 = r0 + worker * n // num_workers, r0 + (worker + 1) * n // num_workers
        return shard_ids, w0, w1

    def _stream(self, shard_ids: list[int], start: int, end: int) -> Iterator[tuple[str, dict | None]]:
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
                stream = wds.gopen(shard["url"], "rb")
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
            order = (sample_rng(self.seed, epoch, f"__chunk_{self.rank}_{worker}_{chunk_index}__").permutation(len(buffer))
                     if self.shuffle else range(len(buffer)))
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


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class PriorLoader:
    """Batches for one rank; iterate once per epoch. See the module docstring for the rule."""

    def __init__(self, data, tokenizer, micro_batch_size: int, split: str = "train",
                 transform=None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, num_workers: int = 0, mode: Mode | None = None,
                 shuffle: bool = True, last_batch: LastBatch = "uneven",
                 label_names: list[str] | None = None, samples_per_epoch: int | None = None,
                 prefetch_factor: int = 2, stream_chunk: int = 256):
        from prior_dist.data.transforms import TransformConfig

        default_rank, default_world = _default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        self.sources = parse_sources(data)
        remote = any(s.remote for s in self.sources)
        self.mode: Mode = mode or ("stream" if remote else "indexed")
        if self.mode not in ("indexed", "stream", "resampled"):
            raise ValueError(f"mode must be 'indexed', 'stream' or 'resampled', got {self.mode!r}")
        if remote and self.mode != "stream":
            raise ValueError("remote sources (pipe:, http(s)://) cannot seek: use mode='stream'")
        if self.mode == "stream" and any(s.weight != 1.0 for s in self.sources):
            raise ValueError("stream mode reads each shard once: source weights other than 1 need "
                             "mode='indexed' or 'resampled'")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.transform = SampleTransform(tokenizer, transform or TransformConfig(), seed, label_names)
        self.index = SplitIndex(self.sources, split, need_offsets=self.mode != "stream")
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.last_batch = last_batch
        self.pad_token_id = tokenizer.pad_token_id
        total = (samples_per_epoch or len(self.index)) if self.mode == "resampled" else self.index.epoch_length()
        self.samples_per_epoch = total
        if self.mode == "stream":
            per_rank = (-(-total // self.world_size) if last_batch == "uneven" else total // self.world_size)
            steps = (-(-per_rank // micro_batch_size) if last_batch == "uneven" else per_rank // micro_batch_size)
            self.plan = BatchPlan(steps * micro_batch_size * self.world_size, micro_batch_size,
                                  self.world_size, "drop")
            self.stream = StreamSamples(self.index, self.rank, self.world_size, self.transform,
                                        seed, shuffle, stream_chunk)
        else:
            self.plan = BatchPlan(total, micro_batch_size, self.world_size, last_batch)
            self.batches = IndexedBatches(self.index, self.plan, self.rank, self.transform, seed,
                                          shuffle, self.mode, samples_per_epoch, self.pad_token_id)
        self.epoch = 0
        self.step = 0
        self.worker_consumed: list[int] = []
        self.skipped = Counter()
        self.skipped_examples: list[str] = []

    def __len__(self) -> int:
        return self.plan.num_steps

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (position 0) unless already there, so a resumed position is kept."""
        if epoch != self.epoch:
            self.epoch, self.step, self.worker_consumed = epoch, 0, []

    def _count_skips(self, errors: list[str]) -> None:
        for error in errors:
            self.skipped["corrupt_sample"] += 1
            if len(self.skipped_examples) < 10:
                self.skipped_examples.append(error)

    def _loader_kwargs(self) -> dict:
        if self.num_workers == 0:
            return {"num_workers": 0}
        return {"num_workers": self.num_workers, "prefetch_factor": self.prefetch_factor,
                "persistent_workers": False}

    def __iter__(self) -> Iterator[dict]:
        if self.step >= self.plan.num_steps:
            self.epoch, self.step, self.worker_consumed = self.epoch + 1, 0, []
        if self.mode == "stream":
            yield from self._iter_stream()
        else:
            sampler = _StepSampler(self.epoch, self.step, self.plan.num_steps)
            loader = DataLoader(self.batches, batch_size=None, sampler=sampler,
                                collate_fn=_identity, **self._loader_kwargs())
            for batch in loader:
                self._count_skips(batch["skipped"])
                self.step += 1
                yield batch

    def _iter_stream(self) -> Iterator[dict]:
        workers = max(self.num_workers, 1)
        consumed = self.worker_consumed or [0] * workers
        if len(consumed) != workers:
            raise ValueError(f"stream-mode state was saved with {len(consumed)} workers; "
                             f"this loader has {workers}")
        self.worker_consumed = consumed
        self.stream.epoch = self.epoch
        self.stream.skip_per_worker = list(consumed)
        loader = DataLoader(self.stream, batch_size=None, collate_fn=_identity, **self._loader_kwargs())
        labels = len(self.transform.label_names) if self.transform.label_names else None
        pending, errors = [], []
        items = iter(loader)
        while self.step < self.plan.num_steps:
            taken = 0
            for item in items:
                self.worker_consumed[item["worker"]] += 1
                taken += 1
                if item["sample"] is None:
                    errors.append(item["error"])
                else:
                    pending.append(item["sample"])
                if taken == self.micro_batch_size:
                    break
            batch = collate(pending, self.pad_token_id, self.transform.config.image_size, labels)
            batch.update({"epoch": self.epoch, "step": self.step, "skipped": errors})
            self._count_skips(errors)
            pending, errors = [], []
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        """The exact position: the next batch a resumed loader yields is the one not yet seen."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "mode": self.mode,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size,
                "samples_per_epoch": self.samples_per_epoch,
                "worker_consumed": list(self.worker_consumed), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("mode") != self.mode:
            raise ValueError(f"loader state has seed={state.get('seed')} mode={state.get('mode')}; "
                             f"this loader has seed={self.seed} mode={self.mode}")
        if state.get("samples_per_epoch") != self.samples_per_epoch:
            raise ValueError(f"loader state was saved for {state.get('samples_per_epoch')} samples per "
                             f"epoch; the data now gives {self.samples_per_epoch}")
        global_batch = self.micro_batch_size * self.world_size
        saved_global = state["micro_batch_size"] * state["world_size"]
        if self.mode == "stream" and (state["world_size"], state["micro_batch_size"]) != (self.world_size, self.micro_batch_size):
            raise ValueError("stream-mode state cannot move to another world size or micro-batch")
        if saved_global != global_batch:
            raise ValueError(f"loader state was saved with a global batch of {saved_global} "
                             f"({state['world_size']} ranks x {state['micro_batch_size']}); this "
                             f"run has {global_batch}: the position would not map to whole steps")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.worker_consumed = list(state.get("worker_consumed", []))
        self.skipped = Counter(state.get("skipped", {}))
