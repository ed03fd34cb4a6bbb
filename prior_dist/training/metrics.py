"""What the user sees: metrics.jsonl per optimizer step, optional TensorBoard, a progress bar,
and the per-rank sample audit. Files are rewritten on resume so they hold each step once."""

from __future__ import annotations

import json
import resource
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from prior_dist.atomic import write_text
from prior_dist.runs.layout import RESOLVED_CONFIG


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines with `step <= last_step` (a resumed run rewrites the steps after it)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    write_text(path, "".join(line + "\n" for line in kept))


class JsonlWriter:
    def __init__(self, path: Path, resume_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(path, resume_step)
        self.handle = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.handle.close()


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class TensorBoardReport:
    """Every scalar of each step's record under its name; the resolved config as text."""

    def __init__(self, run_dir: Path, config: dict):
        # TensorBoard is optional (logging.report_to); the package may be absent.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"<pre>{json.dumps(config, indent=2)}</pre>", 0)

    def log(self, scalars: dict, step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbReport:
    """A Weights & Biases run under RUN_DIR/wandb with the resolved config as its config. Its
    id is kept in RUN_DIR/wandb_run_id, so a resumed run continues the same W&B run (W&B drops
    the steps a resume rewrites: they are older than its last step)."""

    def __init__(self, run_dir: Path, config: dict, project: str):
        # Weights & Biases is optional (logging.report_to) and slow to import.
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Rank 0 writes `metrics.jsonl` and reports to `logging.report_to`; every rank may write
    its audit file."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        resume_step: int,
        report_to: tuple[str, ...],
        audit: bool,
        progress_total: int | None,
        wandb_project: str = "prior_dist",
    ):
        self.rank = rank
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl", resume_step) if rank == 0 else None
        self.audit = (
            JsonlWriter(run_dir / "samples" / f"rank{rank}.jsonl", resume_step) if audit else None
        )
        self.reporters: list = []
        if rank == 0 and set(report_to) - {"jsonl"}:
            resolved = run_dir / RESOLVED_CONFIG
            config = json.loads(resolved.read_text()) if resolved.is_file() else {}
            if "tensorboard" in report_to:
                self.reporters.append(TensorBoardReport(run_dir, config))
            if "wandb" in report_to:
                self.reporters.append(WandbReport(run_dir, config, wandb_project))
        self.bar = None
        if progress_total is not None and rank == 0:
            self.bar = tqdm(
                total=progress_total, initial=resume_step, unit="step", dynamic_ncols=True
            )

    def step(
        self,
        record: dict,
        keys: list[str] | None = None,
        bank_sha256: str | None = None,
        rank_memory_mb: float | None = None,
    ) -> None:
        if self.audit is not None and keys is not None:
            line = {"step": record["step"], "keys": keys, "memory_mb": rank_memory_mb}
            if bank_sha256 is not None:
                line["prototype_bank_sha256"] = bank_sha256
            self.audit.write(line)
        if self.rank != 0:
            return
        self.metrics.write(record)
        scalars = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        for reporter in self.reporters:
            reporter.log(scalars, record["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                stage=record["stage"],
                loss=f"{record['loss']:.4f}",
                sps=f"{record['samples_per_s']:.1f}",
            )

    def close(self) -> None:
        for writer in (self.metrics, self.audit):
            if writer is not None:
                writer.close()
        for reporter in self.reporters:
            reporter.close()
        if self.bar is not None:
            self.bar.close()


class DataWaitWatch:
    """Rank 0's warning that the loader holds training back: over each window of steps, the
    time spent waiting for batches against the time of the steps."""

    def __init__(
        self, threshold: float | None, window: int, workers: int, log: Callable[[str], None]
    ):
        self.threshold, self.window, self.workers, self.log = threshold, window, workers, log
        self.wait = self.time = 0.0
        self.steps: list[int] = []

    def add(self, step: int, wait_s: float, step_s: float) -> None:
        if self.threshold is None:
            return
        self.wait, self.time = self.wait + wait_s, self.time + step_s
        self.steps.append(step)
        if len(self.steps) < self.window:
            return
        share = self.wait / max(self.time, 1e-9)
        if share > self.threshold:
            self.log(
                f"data wait {100 * share:.0f}% of the step time over steps {self.steps[0]}.."
                f"{self.steps[-1]} (warning above {100 * self.threshold:.0f}%): the loader is "
                f"the bottleneck; raise data.workers (now {self.workers}), or store shards at "
                "the training size (shardify --image-size 224 --resize square)"
            )
        self.wait = self.time = 0.0
        self.steps = []
