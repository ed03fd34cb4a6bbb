"""One optimizer step, enqueued without waiting for the device.

`StepRunner.train_step` reads top to bottom: fetch `gradient_accumulation_steps` micro-batches
whose sizes every rank agrees on (on the host), finish each on the device (`device_batch`: the
loader's `finish`), `forward_backward_step` each, then the optimizer step. Nothing in between
reads a device value:
- the losses stay on the device as one vector per step (`StepOutcome.values`); the trainer
  reads them once per `logging.every` steps in one stacked transfer;
- a NaN/inf loss on any rank skips the whole optimizer step on the device: the finite flags
  are combined (one all-reduce on several ranks) into the fused AdamW's `found_inf`, which
  leaves parameters, moments and step counts as they were. An optimizer that cannot take the
  flag (DeepSpeed's CPU Adam, a non-fused AdamW) falls back to reading it on the host before
  the backward and skipping that micro-batch, as before;
- a micro-batch that lost samples to corrupt data on any rank is skipped by every rank: the
  sizes are host values, agreed over a gloo group (no device involved; none on one rank).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from prior_dist.seeding import torch_seed
from prior_dist.task import LOSS_NAMES, StagePlan
from prior_dist.task.noise import SampleNoise, noise_seeds
from prior_dist.training.ds_config import DeepSpeedSettings
from prior_dist.training.engine import base_optimizer, start_prototype_bank

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# The layout of a step's value vector: the weighted total, each loss (0 where the stage does
# not run it), the two logit scales, and 1.0 where the optimizer step was skipped.
VALUE_NAMES = ("total", *LOSS_NAMES, "logit_scale", "local_logit_scale", "skipped")
_SCALES = slice(VALUE_NAMES.index("logit_scale"), VALUE_NAMES.index("skipped"))


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN or inf loss."""


class HostVote:
    """Agreement among the ranks on host values (a gloo group: it never waits for a device).
    One rank agrees with itself without a collective."""

    def __init__(self) -> None:
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every rank builds the runner

    def __call__(self, values: list[float], op: dist.ReduceOp = dist.ReduceOp.MAX) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()


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
    return torch_seed(f"{seed}|dropout|{rank}|{step}|{micro}")


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW skip a step on the device when `found_inf` is set."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(
        optimizer.defaults.get("fused")
    )


@dataclass
class StepOutcome:
    values: torch.Tensor  # [len(VALUE_NAMES)] on the device: this rank's, see VALUE_NAMES
    keys: list[str]  # the sample keys this rank trained on
    epoch: int
    wait_s: float  # time spent waiting for the loader


def _no_phase(_name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


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
        self.vote = HostVote()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.optimizer = base_optimizer(engine)
        self.skip_on_device = takes_found_inf(self.optimizer)
        self.bad_streak = 0  # host fallback only: non-finite micro-batches in a row
        self.skipped: Counter = Counter()
        # FLOPs of one micro-batch's forward + backward, counted once per curriculum stage (the
        # stages run different losses), on CUDA only: the MFU of each step's record.
        self.flops_per_micro: dict[int, float] = {}
        self.start_bank = False  # set at the start of stage 2 (heads.prototype_init)
        self.step = 0  # the optimizer step being run, 1-based
        # `phase(name)` brackets "data" (fetching, agreeing on and moving micro-batches: host
        # work), "forward", "backward" and "optimizer"; a counter may watch.
        self.phase: Callable[[str], contextlib.AbstractContextManager] = _no_phase

    def _forever(self) -> Iterator[dict]:
        while True:
            yield from self.loader

    def close(self) -> None:
        """Stop the loader's workers now. They ignore SIGTERM (the rank owns shutdown), so one
        left waiting at interpreter exit would hang the exit: closing the generator drops the
        DataLoader iterator, and the loader's own close ends the workers it keeps across epochs."""
        self.batches.close()
        self.loader.close()

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, step: int, plan: StagePlan) -> StepOutcome:
        """Optimizer step `step`: `gradient_accumulation_steps` micro-batches, then the update."""
        self.step = step
        gas = self.ds.gradient_accumulation_steps
        summed = torch.zeros(len(VALUE_NAMES), device=self.device)
        finite = torch.ones((), device=self.device)
        queue: list[dict] = []
        keys: list[str] = []
        wait, good, micro = 0.0, 0, 0
        while good < gas:
            if not queue:
                with self.phase("data"):
                    queue, waited = self._agreed_micro_batches(gas - good)
                wait += waited
            batch = queue.pop(0)
            result = self.forward_backward_step(batch, plan, micro)
            micro += 1
            if result is None:  # the host fallback skipped a non-finite micro-batch
                continue
            values, ok = result
            summed += values / gas
            finite = finite * ok
            keys += batch["key"]
            good += 1
        if self.skip_on_device and self.vote.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # skipped if any rank's was not finite
        self._optimizer_step(finite)
        summed[VALUE_NAMES.index("skipped")] = 1.0 - finite
        scales = self.engine.module.model.logit_scales()
        summed[_SCALES] = torch.stack(scales).detach().float()
        return StepOutcome(summed, keys, self.loader.epoch, wait)

    def _agreed_micro_batches(self, count: int) -> tuple[list[dict], float]:
        """`count` micro-batches of the full size on every rank (a short one on any rank is
        dropped by all of them); the time spent waiting for the loader."""
        kept: list[dict] = []
        wait = 0.0
        while len(kept) < count:
            start = time.perf_counter()
            fetched = [next(self.batches) for _ in range(count - len(kept))]
            wait += time.perf_counter() - start
            smallest = self.vote([float(len(b["key"])) for b in fetched], dist.ReduceOp.MIN)
            for batch, size in zip(fetched, smallest):
                if size < self.ds.micro_batch_size:
                    self.skipped["short_batch"] += 1
                    self.log(
                        f"step {self.step}: a rank's micro-batch lost samples to corrupt data "
                        f"({int(size)} < {self.ds.micro_batch_size}); skipped on every rank"
                    )
                else:
                    kept.append(batch)
        return kept, wait

    def device_batch(self, batch: dict) -> dict:
        """The batch finished on the device by its loader, its samples' noise seeds with it."""
        data = self.loader.finish(batch, self.device, self.dtype)
        if self.tie_noise:
            seeds = noise_seeds(batch["key"], self.loader.epoch, self.seed)
            data["noise_seed"] = seeds.to(self.device, non_blocking=True)
        return data

    def forward_backward_step(
        self, batch: dict, plan: StagePlan, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forward and backward of one micro-batch: its value vector and 1.0 if its loss is
        finite else 0.0 (this rank's), both on the device; None where the host fallback skipped
        it."""
        with self.phase("data"):
            data = self.device_batch(batch)
        if self.start_bank:
            distinct = start_prototype_bank(self.engine, data, self.seed, self.ds.zero_stage)
            self.log(f"prototype bank set from {distinct} distinct sentences")
            self.start_bank = False
        noise = SampleNoise(data["noise_seed"]) if self.tie_noise else None
        torch.manual_seed(micro_batch_seed(self.seed, self.rank, self.step, micro))
        with self.phase("forward"):
            out = self.forward(data, plan, noise)
        loss = out["total"]
        finite = torch.isfinite(loss.detach()).float()
        if not self.skip_on_device and not self._finite_on_host(finite):
            return None
        with self.phase("backward"):
            self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            with self.phase("optimizer"):
                self.engine.step()  # accumulates; the update is at the boundary
        zero = loss.new_zeros((), dtype=torch.float32)
        values = torch.stack(
            [loss.detach().float()]
            + [out[n].detach().float() if n in out else zero for n in LOSS_NAMES]
            + [zero] * 3
        )
        return values, finite

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """The update at the accumulation boundary; skipped on the device when a loss was not
        finite (the fused AdamW's `found_inf`)."""
        if self.skip_on_device:
            self.optimizer.found_inf = (1.0 - finite).float()
        try:
            with self.phase("optimizer"):
                self.engine.step()
        finally:
            if self.skip_on_device:
                del self.optimizer.found_inf

    def forward(self, data: dict, plan: StagePlan, noise) -> dict:
        """The task's losses for one micro-batch (FLOPs counted once per stage on CUDA, for MFU;
        the backward pass is taken as twice the forward)."""
        if plan.stage not in self.flops_per_micro and self.device.type == "cuda":
            with FlopCounterMode(display=False) as counter:
                out = self.engine(data, plan, noise)
            self.flops_per_micro[plan.stage] = 3 * counter.get_total_flops()
            return out
        return self.engine(data, plan, noise)

    def _finite_on_host(self, finite: torch.Tensor) -> bool:
        """The fallback: agree on the flag, read it (a host sync) and skip the micro-batch's
        backward when it is not finite; `max_nonfinite` in a row abort the run."""
        if self.vote.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            self.bad_streak = 0
            return True
        self.bad_streak += 1
        self.skipped["nonfinite_loss"] += 1
        self.log(
            f"step {self.step}: non-finite loss on some rank; micro-batch skipped "
            f"({self.bad_streak} in a row, limit {self.max_nonfinite})"
        )
        if self.bad_streak >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.bad_streak} micro-batches in a row gave a NaN or inf loss at step "
                f"{self.step}; aborting. Lower the learning rate, check the data, or use "
                "bf16/fp32"
            )
        return False
