"""A `torch.profiler` window over chosen optimizer steps (`logging.profile_steps`), on rank 0.

Writes RUN_DIR/profile/: `ops.txt`, the operators sorted by their own device time (CUDA) and by
their own CPU time, and `trace.json`, a Chrome trace (chrome://tracing, Perfetto). It answers
where a step's time goes when the step is slower than its FLOPs say (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROFILE_DIR = "profile"


class StepProfiler:
    """`before(step)` / `after(step)` around each optimizer step (1-based); profiles steps
    first..last inclusive, then writes its files once."""

    def __init__(
        self,
        steps: tuple[int, int] | None,
        run_dir: Path,
        device: torch.device,
        rank: int,
        log: Callable[[str], None],
    ):
        self.first, self.last = steps if steps and rank == 0 else (None, None)
        self.out = run_dir / PROFILE_DIR
        self.cuda = device.type == "cuda"
        self.log = log
        self.active: profile | None = None

    def before(self, step: int) -> None:
        if self.first is not None and self.active is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities)
            self.active.__enter__()
            self.started = step

    def after(self, step: int) -> None:
        if self.active is not None and step >= self.last:
            self.finish(step)

    def finish(self, step: int) -> None:
        """Stop and write, if a window is open (also when a run ends inside its window)."""
        if self.active is None:
            return
        self.active.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        averages = self.active.key_averages()
        keys = ["self_device_time_total"] if self.cuda else []
        tables = [
            f"steps {self.started}..{step}, sorted by {key}:\n"
            + averages.table(sort_by=key, row_limit=40)
            for key in keys + ["self_cpu_time_total"]
        ]
        (self.out / "ops.txt").write_text("\n\n".join(tables))
        self.active.export_chrome_trace(str(self.out / "trace.json"))
        self.active, self.first = None, None
        self.log(f"profile of steps {self.started}..{step} in {self.out}")
