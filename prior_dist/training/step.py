"""One optimizer step: `gradient_accumulation_steps` good micro-batches on every rank.

A micro-batch that lost samples to corrupt data on any rank, or whose loss is NaN/inf on any
rank, is skipped by every rank (ranks agree by an all-reduce, so they stay in step); N
non-finite micro-batches in a row abort the run.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from prior_dist.data.transforms import TransformConfig, apply_geometry
from prior_dist.task import StagePlan
from prior_dist.training.ds_config import DeepSpeedSettings

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
_BATCH_TENSORS = ("image", "input_ids", "attention_mask", "sentence_index")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches with a NaN or inf loss."""


def agree(
    values: list[float], device: torch.device, op: dist.ReduceOp = dist.ReduceOp.MAX
) -> list[float]:
    """`values` all-reduced over the ranks with `op` (every rank gets the same answer)."""
    t = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        t = t.to(device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def to_device(
    batch: dict, device: torch.device, dtype: torch.dtype, pixels: TransformConfig | None = None
) -> dict:
    """The batch's tensors on `device`. A batch whose geometry the loader left to the step
    (uint8 images with `angle`) is finished here, as one batched affine on the device, and
    normalised with `pixels`' mean and std."""
    out = {
        k: (v.to(device, non_blocking=True) if k in _BATCH_TENSORS else v) for k, v in batch.items()
    }
    if "angle" in batch:
        if pixels is None:
            raise ValueError("a batch with its geometry left to the step needs the transform")
        out["image"] = apply_geometry(
            out["image"], batch["angle"], batch["flipped"], pixels.mean, pixels.std
        )
    # The engine holds bf16/fp16 weights under mixed precision: images follow them.
    out["image"] = out["image"].to(dtype)
    return out


def peak_flops(device: torch.device) -> float:
    """The device's peak dense bf16 FLOP/s (`PRIOR_PEAK_FLOPS` overrides; NaN if unknown)."""
    name = torch.cuda.get_device_name(device)
    return float(os.environ.get("PRIOR_PEAK_FLOPS", 0)) or next(
        (v for k, v in PEAK_FLOPS.items() if k in name), math.nan
    )


def micro_batch_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The seed of torch's global generator for a forward pass (micro-batch `micro` of optimizer
    step `step` on `rank`): dropout, its one use in training, then depends on these alone, so a
    resumed run draws exactly what the uninterrupted one did, whatever else drew from the
    generator in between (a DataLoader iterator drawing its base seed, an evaluation)."""
    text = f"{seed}|dropout|{rank}|{step}|{micro}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class StepOutcome:
    totals: dict[str, float]  # each loss averaged over this rank's micro-batches
    keys: list[str]  # the sample keys this rank trained on
    epoch: int
    wait_s: float  # time spent waiting for the loader


class StepRunner:
    """Runs optimizer steps on a DeepSpeed engine wrapping a `PriorTask`."""

    def __init__(
        self,
        engine,
        loader,
        ds: DeepSpeedSettings,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        tie_noise: bool,
        max_nonfinite: int,
        log: Callable[[str], None],
    ):
        self.engine, self.loader, self.ds = engine, loader, ds
        self.device, self.dtype, self.seed = device, dtype, seed
        self.tie_noise, self.max_nonfinite, self.log = tie_noise, max_nonfinite, log
        self.batches = self._forever()
        self.bad_streak = 0
        self.skipped: Counter = Counter()
        # FLOPs of one micro-batch's forward + backward, counted once per curriculum stage (the
        # stages run different losses), on CUDA only: the MFU of each step's record.
        self.flops_per_micro: dict[int, float] = {}
        self.start_bank = False  # set at the start of stage 2 (heads.prototype_init)
        self.step = 0  # the optimizer step being run, 1-based
        self.micro = 0  # forward passes so far in this step

    def _forever(self) -> Iterator[dict]:
        while True:
            yield from self.loader

    def close(self) -> None:
        """Stop the loader's workers now. They ignore SIGTERM (the rank owns shutdown), so one
        left waiting at interpreter exit would hang the exit: closing the generator drops the
        DataLoader iterator, which tells its workers to finish and joins them."""
        self.batches.close()

    def forward(self, data: dict, plan: StagePlan, noise: dict | None) -> dict:
        """The task's losses for one micro-batch (FLOPs counted once per stage on CUDA, for MFU;
        the backward pass is taken as twice the forward)."""
        if plan.stage not in self.flops_per_micro and self.device.type == "cuda":
            with FlopCounterMode(display=False) as counter:
                out = self.engine(data, plan, noise)
            self.flops_per_micro[plan.stage] = 3 * counter.get_total_flops()
            return out
        return self.engine(data, plan, noise)

    def run(self, step: int, plan: StagePlan, lr: float, stage: int) -> StepOutcome:
        """Optimizer step `step`: micro-batches until `gradient_accumulation_steps` good ones."""
        self.step, self.micro = step, 0
        gas = self.ds.gradient_accumulation_steps
        totals: dict[str, float] = collections.defaultdict(float)
        keys: list[str] = []
        wait, good, epoch = 0.0, 0, self.loader.epoch
        while good < gas:
            t0 = time.perf_counter()
            batch = next(self.batches)
            wait += time.perf_counter() - t0
            epoch = self.loader.epoch
            out = self._micro_batch(batch, plan, lr, stage)
            if out is None:
                continue
            good += 1
            keys += list(batch["key"])
            for name, value in out.items():
                totals[name] += float(value.detach()) / gas
        return StepOutcome(totals, keys, epoch, wait)

    def _micro_batch(self, batch: dict, plan: StagePlan, lr: float, stage: int) -> dict | None:
        """Forward, backward and engine step of one micro-batch; None when every rank skips it."""
        smallest = agree([float(len(batch["key"]))], self.device, dist.ReduceOp.MIN)[0]
        if smallest < self.ds.micro_batch_size:
            self.skipped["short_batch"] += 1
            self.log(
                f"step {self.step}: a rank's micro-batch lost samples to corrupt data "
                f"({int(smallest)} < {self.ds.micro_batch_size}); skipped on every rank"
            )
            return None
        data = to_device(batch, self.device, self.dtype, self.loader.transform.config)
        task = self.engine.module
        if self.start_bank:
            distinct = task.start_prototype_bank(data, self.seed, self.ds.zero_stage)
            self.log(f"prototype bank set from {distinct} distinct sentences")
            self.start_bank = False
        noise = (
            task.tied_noise(batch, self.loader.epoch, self.seed, self.device)
            if self.tie_noise
            else None
        )
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.manual_seed(micro_batch_seed(self.seed, rank, self.step, self.micro))
        self.micro += 1
        out = self.forward(data, plan, noise)
        loss = out["total"]
        finite = agree(
            [float(torch.isfinite(loss.detach()).all())], self.device, dist.ReduceOp.MIN
        )[0]
        if not finite:
            self._non_finite(stage, lr)
            return None
        self.bad_streak = 0
        self.engine.backward(loss)
        self.engine.step()
        return out

    def _non_finite(self, stage: int, lr: float) -> None:
        self.bad_streak += 1
        self.skipped["nonfinite_loss"] += 1
        self.log(
            f"step {self.step}: non-finite loss on some rank; micro-batch skipped "
            f"({self.bad_streak} in a row, limit {self.max_nonfinite})"
        )
        if self.bad_streak >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.bad_streak} micro-batches in a row gave a NaN or inf loss at step "
                f"{self.step} (stage {stage}, lr {lr:.3g}); aborting. Lower the learning rate, "
                "check the data, or use bf16/fp32"
            )
