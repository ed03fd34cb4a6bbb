"""The exactly-once, world-size-independent, resumable loader.

The rule (indexed mode, the default for local shards): one epoch is a permutation of every
sample id, drawn from (seed, epoch) only. Global batch t (the loader's batch index; one
micro-batch on every rank, not the trainer's optimizer step, which takes
`gradient_accumulation_steps` of them) covers positions [t*G, (t+1)*G) of that permutation,
G = micro_batch * world_size, and rank r takes the r-th block of B of them. So every sample is
served exactly once per epoch, every rank yields the same number of batches, and 2 ranks of
micro-batch B see, batch by batch, exactly the samples of 1 rank of micro-batch 2B.
Samples are read by byte offset (the split's `{split}.index.bin`, one memory-mapped array of
every sample's shard and offsets, `data/compact.py`), so any rank or worker can serve any
sample; batches are built whole inside DataLoader workers, and `finish` completes them on the
training device.

The last, partial global batch (N not a multiple of G): `last_batch="uneven"` (default) splits
it as evenly as possible over ranks (sizes differ by at most one, possibly zero), so nothing is
dropped; `"drop"` leaves it out. Either way all ranks yield the same number of batches.

Stream mode (the only mode for remote sources: `pipe:` commands, http/https, s3/gs object
stores, which are read front to back) keeps exactly-once and equal batch counts (each rank
streams a contiguous range of the epoch's shard-order concatenation, skipping into its first
shard), but the batches then depend on the world size and the number of workers. Resampled
mode draws every epoch's samples with replacement.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prior_dist.data.index import (
    BatchPlan,
    LastBatch,
    Mode,
    ShardReader,
    SplitIndex,
    epoch_order,
    parse_sources,
)
from prior_dist.data.streaming import StreamSamples
from prior_dist.data.transforms import (
    CorruptSample,
    SampleTransform,
    TransformConfig,
    apply_geometry,
    collate,
    sample_rng,
)

# What `finish` moves to the device: the tensors the model reads there.
DEVICE_TENSORS = ("image", "input_ids", "attention_mask", "sentence_index", "angle", "flipped")


class IndexedBatches(Dataset):
    """Map-style dataset of whole batches, indexed by (epoch, batch index): any worker builds
    any batch."""

    def __init__(
        self,
        index: SplitIndex,
        plan: BatchPlan,
        rank: int,
        transform: SampleTransform,
        seed: int,
        shuffle: bool,
        mode: Mode,
        samples_per_epoch: int | None,
        pad_token_id: int,
    ):
        self.index, self.plan, self.rank = index, plan, rank
        self.transform, self.seed, self.shuffle = transform, seed, shuffle
        self.mode, self.samples_per_epoch = mode, samples_per_epoch
        self.pad_token_id = pad_token_id
        self._order_epoch, self._order = None, None
        self._files = ShardReader()

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(
                self.index, self.seed, epoch, self.shuffle, self.mode, self.samples_per_epoch
            )
            self._order_epoch = epoch
        return self._order

    def __len__(self) -> int:
        return self.plan.num_batches

    def load(self, sample_id: int, epoch: int) -> dict:
        key = self.index.key(sample_id)
        try:
            members = self._files.members(self.index, sample_id)
        except OSError as exc:
            raise CorruptSample(f"{self.index.shard_of(sample_id)['url']}: {key}: {exc}") from exc
        return self.transform(key, members, epoch)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        start, end = self.plan.rank_slice(index, self.rank)
        samples, skipped = [], []
        for sample_id in self.order(epoch)[start:end]:
            try:
                samples.append(self.load(int(sample_id), epoch))
            except CorruptSample as exc:
                skipped.append(str(exc))
        cfg = self.transform.config
        labels = len(self.transform.label_names) if self.transform.label_names else None
        batch = collate(samples, self.pad_token_id, cfg.image_size, labels, cfg.augment_in, cfg)
        batch.update({"epoch": epoch, "batch_index": index, "skipped": skipped})
        return batch


class _BatchSampler(Sampler):
    """Batch indexes `start..stop` of `epoch`. A persistent DataLoader keeps one sampler for its
    life: the loader moves it to the next epoch or a resumed batch index before each
    iteration."""

    def __init__(self, epoch: int, start: int, stop: int):
        self.epoch, self.start, self.stop = epoch, start, stop

    def __iter__(self):
        return ((self.epoch, s) for s in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _identity(x):
    return x


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGINT to the main process: a signal sent to the
    whole process group (`timeout`, container runtimes, schedulers) must not kill the workers
    first, or the rank dies before the checkpoint the signal asks for. A SIGTERM from the main
    process itself (how multiprocessing ends workers at interpreter exit) still ends the worker:
    ignoring that one would hang the exit. Told apart by the sender's pid, which only
    `sigwaitinfo` sees, so SIGTERM is blocked and a thread waits for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()
    threading.Thread(
        target=_end_on_sigterm_from, args=(parent,), name="sigterm-from-parent", daemon=True
    ).start()


@contextlib.contextmanager
def _stop_signals_held(num_workers: int):
    """SIGTERM and SIGINT blocked in this thread while DataLoader workers are forked: a worker
    inherits the mask, so a group signal that lands between its fork and `_ignore_stop_signals`
    waits (the worker's thread then takes it) instead of killing it. One that reaches the main
    process meanwhile is delivered when the mask is restored."""
    if num_workers == 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent or os.getppid() != parent:
            os._exit(0)  # a clean end: the main process asked for it


def _choose_mode(sources: list, mode: Mode | None) -> Mode:
    """`mode`, or stream mode for remote sources and indexed mode otherwise; refuses what the
    sources cannot do."""
    remote = any(s.remote for s in sources)
    chosen = mode or ("stream" if remote else "indexed")
    if chosen not in ("indexed", "stream", "resampled"):
        raise ValueError(f"mode must be 'indexed', 'stream' or 'resampled', got {chosen!r}")
    if remote and chosen != "stream":
        raise ValueError(
            "remote sources (pipe:, http(s)://, s3://, gs://) are read front to back: use "
            "mode='stream'"
        )
    if chosen == "stream" and any(s.weight != 1.0 for s in sources):
        raise ValueError(
            "stream mode reads each shard once: source weights other than 1 need "
            "mode='indexed' or 'resampled'"
        )
    return chosen


def _stream_plan(total: int, micro_batch_size: int, world_size: int, last_batch: LastBatch):
    """Stream mode's plan: every rank yields the same number of whole batches per epoch."""
    uneven = last_batch == "uneven"
    per_rank = -(-total // world_size) if uneven else total // world_size
    batches = -(-per_rank // micro_batch_size) if uneven else per_rank // micro_batch_size
    return BatchPlan(batches * micro_batch_size * world_size, micro_batch_size, world_size, "drop")


class PriorLoader:
    """Batches for one rank; iterate once per epoch. See the module docstring for the rule.

    `pin_memory`: page-locked batches for a CUDA consumer, whose non_blocking copies then
    overlap the step. `persistent_workers`: indexed mode keeps its workers from one epoch to the
    next (no fork and start-up stall at each boundary); a batch depends on (epoch, batch index)
    only, so which process builds it changes nothing. Stream-mode workers hold their epoch's shard
    ranges and are forked again each epoch.
    """

    def __init__(
        self,
        data,
        tokenizer,
        micro_batch_size: int,
        split: str = "train",
        transform=None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        mode: Mode | None = None,
        shuffle: bool = True,
        last_batch: LastBatch = "uneven",
        label_names: list[str] | None = None,
        samples_per_epoch: int | None = None,
        prefetch_factor: int = 2,
        stream_chunk: int = 256,
        pin_memory: bool = False,
        io_retries: int = 6,
        io_backoff_s: float = 1.0,
        prefetch_shards: int = 1,
        persistent_workers: bool = True,
    ):
        default_rank, default_world = _default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        self.sources = parse_sources(data)
        self.mode = _choose_mode(self.sources, mode)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.config = transform or TransformConfig()
        self.sample_transform = SampleTransform(tokenizer, self.config, seed, label_names)
        self.index = SplitIndex(self.sources, split, need_offsets=self.mode != "stream")
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self._dataloader: DataLoader | None = None
        self.last_batch = last_batch
        self.pad_token_id = tokenizer.pad_token_id
        total = (
            (samples_per_epoch or len(self.index))
            if self.mode == "resampled"
            else self.index.epoch_length()
        )
        self.samples_per_epoch = total
        if self.mode == "stream":
            self.plan = _stream_plan(total, micro_batch_size, self.world_size, last_batch)
            self.stream = StreamSamples(
                self.index,
                self.rank,
                self.world_size,
                self.sample_transform,
                seed,
                shuffle,
                stream_chunk,
                io_retries,
                io_backoff_s,
                prefetch_shards,
            )
        else:
            self.plan = BatchPlan(total, micro_batch_size, self.world_size, last_batch)
            self.batches = IndexedBatches(
                self.index,
                self.plan,
                self.rank,
                self.sample_transform,
                seed,
                shuffle,
                self.mode,
                samples_per_epoch,
                self.pad_token_id,
            )
        self.epoch = 0
        self.batch_index = 0
        self.worker_consumed: list[int] = []
        self.skipped = Counter()
        self.skipped_examples: list[str] = []
        self.io_retries = 0  # object-store transfers resumed after a transient error

    def __len__(self) -> int:
        return self.plan.num_batches

    def finish(self, batch: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
        """One of this loader's batches as the model takes it, on `device`: the tensors the
        model reads moved there (non-blocking: `pin_memory` pins them for CUDA); the rotation
        and flip the workers left to the step (`augment_in="step"`: uint8 images with each
        sample's `angle`) applied there as one batched affine and normalised with this loader's
        mean and std; images in `dtype` (the engine's weights') and, on CUDA, in the
        channels_last layout the convolutions run in. Host values (keys, sentences, the
        sentence-slot count, labels) stay on the host: nothing here reads the device."""
        out = {
            k: (v.to(device, non_blocking=True) if k in DEVICE_TENSORS else v)
            for k, v in batch.items()
        }
        if "angle" in batch:
            # Decided on the host's copies: no device read.
            turn = bool((batch["angle"] != 0).any()) or bool(batch["flipped"].any())
            cfg = self.config
            out["image"] = apply_geometry(
                out["image"], out["angle"], out["flipped"], cfg.mean, cfg.std, turn
            )
        layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
        out["image"] = out["image"].to(dtype, memory_format=layout)
        return out

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (position 0) unless already there, so a resumed position is kept."""
        if epoch != self.epoch:
            self.epoch, self.batch_index, self.worker_consumed = epoch, 0, []

    def _count_skips(self, errors: list[str]) -> None:
        for error in errors:
            self.skipped["corrupt_sample"] += 1
            if len(self.skipped_examples) < 10:
                self.skipped_examples.append(error)

    def _loader_kwargs(self) -> dict:
        # Its own generator: creating the iterator draws the workers' base seed from it, not
        # from torch's global one (which would shift the dropout stream of a resumed run).
        generator = torch.Generator().manual_seed(
            int(sample_rng(self.seed, self.epoch, "__dataloader__").integers(2**62))
        )
        if self.num_workers == 0:
            return {"num_workers": 0, "generator": generator, "pin_memory": self.pin_memory}
        return {
            "generator": generator,
            "pin_memory": self.pin_memory,
            "num_workers": self.num_workers,
            "prefetch_factor": self.prefetch_factor,
            "persistent_workers": self.persistent_workers and self.mode != "stream",
            "worker_init_fn": _ignore_stop_signals,
        }

    def __iter__(self) -> Iterator[dict]:
        if self.batch_index >= self.plan.num_batches:
            self.epoch, self.batch_index, self.worker_consumed = self.epoch + 1, 0, []
        if self.mode == "stream":
            yield from self._iter_stream()
        else:
            with _stop_signals_held(self.num_workers):
                batches = iter(self._indexed_dataloader())  # forks the workers (once if kept)
            for batch in batches:
                self._count_skips(batch["skipped"])
                self.batch_index += 1
                yield batch

    def _indexed_dataloader(self) -> DataLoader:
        """The DataLoader for the current (epoch, batch index): a kept one moved there, or a new
        one."""
        kept = self._dataloader
        if kept is not None and kept.persistent_workers:
            kept.sampler.epoch, kept.sampler.start = self.epoch, self.batch_index
            return kept
        # The epoch's order, drawn here before the workers fork: they share its pages
        # instead of each drawing (and holding) its own copy. Kept workers draw later epochs'.
        self.batches.order(self.epoch)
        sampler = _BatchSampler(self.epoch, self.batch_index, self.plan.num_batches)
        self._dataloader = DataLoader(
            self.batches,
            batch_size=None,
            sampler=sampler,
            collate_fn=_identity,
            **self._loader_kwargs(),
        )
        return self._dataloader

    def close(self) -> None:
        """Stop kept workers now (they would otherwise live as long as this loader)."""
        dataloader, self._dataloader = self._dataloader, None
        iterator = getattr(dataloader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()

    def _iter_stream(self) -> Iterator[dict]:
        workers = max(self.num_workers, 1)
        consumed = self.worker_consumed or [0] * workers
        if len(consumed) != workers:
            raise ValueError(
                f"stream-mode state was saved with {len(consumed)} workers; "
                f"this loader has {workers}"
            )
        self.worker_consumed = consumed
        self.stream.epoch = self.epoch
        self.stream.skip_per_worker = list(consumed)
        loader = DataLoader(
            self.stream, batch_size=None, collate_fn=_identity, **self._loader_kwargs()
        )
        labels = (
            len(self.sample_transform.label_names) if self.sample_transform.label_names else None
        )
        pending, errors = [], []
        with _stop_signals_held(self.num_workers):
            items = iter(loader)  # forks the workers
        while self.batch_index < self.plan.num_batches:
            taken = 0
            for item in items:
                self.worker_consumed[item["worker"]] += 1
                self.io_retries += item["retries"]
                taken += 1
                if item["sample"] is None:
                    errors.append(item["error"])
                else:
                    pending.append(item["sample"])
                if taken == self.micro_batch_size:
                    break
            cfg = self.config
            batch = collate(pending, self.pad_token_id, cfg.image_size, labels, cfg.augment_in, cfg)
            batch.update({"epoch": self.epoch, "batch_index": self.batch_index, "skipped": errors})
            self._count_skips(errors)
            pending, errors = [], []
            self.batch_index += 1
            yield batch

    def state_dict(self) -> dict:
        """The exact position: the next batch a resumed loader yields is the one not yet seen."""
        return {
            "epoch": self.epoch,
            "batch": self.batch_index,
            "seed": self.seed,
            "mode": self.mode,
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
            "samples_per_epoch": self.samples_per_epoch,
            "worker_consumed": list(self.worker_consumed),
            "skipped": dict(self.skipped),
            "io_retries": self.io_retries,
        }

    def load_state_dict(self, state: dict, batches_per_step: int = 1) -> int:
        """Continue from a saved position. One saved with another global batch (ranks x
        micro-batch; indexed and resampled modes) continues from the same sample of the epoch
        order, rounded down to a multiple of `batches_per_step` batches (the gradient accumulation:
        a resume starts an optimizer step); returns how many samples of the epoch are
        therefore served again (0 when the position maps exactly)."""
        if state.get("seed") != self.seed or state.get("mode") != self.mode:
            raise ValueError(
                f"loader state has seed={state.get('seed')} mode={state.get('mode')}; "
                f"this loader has seed={self.seed} mode={self.mode}"
            )
        if state.get("samples_per_epoch") != self.samples_per_epoch:
            raise ValueError(
                f"loader state was saved for {state.get('samples_per_epoch')} samples per "
                f"epoch; the data now gives {self.samples_per_epoch}"
            )
        global_batch = self.micro_batch_size * self.world_size
        saved_global = state["micro_batch_size"] * state["world_size"]
        if self.mode == "stream" and (state["world_size"], state["micro_batch_size"]) != (
            self.world_size,
            self.micro_batch_size,
        ):
            raise ValueError("stream-mode state cannot move to another world size or micro-batch")
        # "step" in checkpoints written before the loader's position was named "batch".
        step, repeated = int(state["batch"] if "batch" in state else state["step"]), 0
        if saved_global != global_batch:
            done = min(step * saved_global, self.samples_per_epoch)
            if done >= self.samples_per_epoch:  # the epoch was finished
                step = self.plan.num_batches
            else:
                step = done // global_batch // batches_per_step * batches_per_step
                repeated = done - step * global_batch
        self.epoch, self.batch_index = int(state["epoch"]), step
        self.worker_consumed = list(state.get("worker_consumed", []))
        self.skipped = Counter(state.get("skipped", {}))
        self.io_retries = int(state.get("io_retries", 0))
        return repeated
