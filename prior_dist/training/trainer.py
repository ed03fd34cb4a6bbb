"""The pretraining run: set-up, the three-stage curriculum loop, evaluation and checkpoints.

One optimizer step is `training.step.StepRunner.run`. SIGTERM/SIGUSR1 on any rank, or the
`deepspeed` launcher above the ranks exiting, make every rank checkpoint at the next step
boundary and exit cleanly; a run resumes from its newest intact complete checkpoint (`--resume
auto`), on the same or, for ZeRO-0, another number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from prior_dist.atomic import publish, write_json
from prior_dist.data.config import DataConfig
from prior_dist.data.run_data import (
    first_local_source,
    load_training_tokenizer,
    shard_directory,
    training_loader,
)
from prior_dist.distributed.env import device_for_local_rank, init_process_group
from prior_dist.distributed.launcher import watch_runner
from prior_dist.evaluation.retrieval import retrieval
from prior_dist.evaluation.zero_shot import PromptOptions, headline_accuracy, zero_shot
from prior_dist.runs import LoadedModel
from prior_dist.runs import checkpoints as ckpt
from prior_dist.runs.layout import (
    EVAL_RESULT,
    PIDS,
    PREEMPTED,
    RESOLVED_CONFIG,
    RUN_TOKENIZER,
    complete_checkpoints,
)
from prior_dist.runs.load import initial_weights
from prior_dist.runs.lock import RunDirInUse, RunLock
from prior_dist.schema import upgrade_moved_fields
from prior_dist.task import LOSS_NAMES, StagePlan, stage_plan
from prior_dist.training.ds_config import DeepSpeedSettings, engine_config
from prior_dist.training.engine import (
    bank_digest,
    build_engine,
    build_task,
    compile_summary,
    precision_dtype,
    prepare_for_device,
    reset_optimizer_state,
    set_learning_rate,
)
from prior_dist.training.metrics import DataWaitWatch, MetricsLogger, memory_mb
from prior_dist.training.profile import StepProfiler
from prior_dist.training.recipe import Recipe
from prior_dist.training.resume_check import compare_recipes, refusal
from prior_dist.training.schedule import StageSpan, learning_rate, plan_stages
from prior_dist.training.step import (
    VALUE_NAMES,
    NonFiniteLossError,
    StepOutcome,
    StepRunner,
    peak_flops,
)

__all__ = ["NonFiniteLossError", "Trainer"]


def _keeping_batch(saved: int, world: int, micro: int, accumulation: int) -> str:
    """A DeepSpeed setting that gives `saved` samples per step on `world` ranks, if one does."""
    if saved % (world * micro) == 0:
        return f" (gradient_accumulation_steps: {saved // (world * micro)})"
    if saved % (world * accumulation) == 0:
        return f" (train_micro_batch_size_per_gpu: {saved // (world * accumulation)})"
    return ""


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        ds: DeepSpeedSettings,
        run_dir: str | Path,
        resume: str = "auto",
        max_steps: int | None = None,
        audit_samples: bool = False,
        raw_recipe: dict | None = None,
        prepare_data: Callable[[DataConfig, Callable[[str], None]], None] | None = None,
    ):
        # Local data paths become absolute: the run directory reads the same from anywhere.
        self.recipe = dataclasses.replace(recipe, data=recipe.data.anchored(Path.cwd()))
        self.ds = ds
        self.run_dir = Path(run_dir)
        self.resume, self.max_steps, self.audit_samples = resume, max_steps, audit_samples
        self.raw_recipe = raw_recipe or recipe.to_dict()
        # Makes the recipe's data where it asks for generated data (phantom shards): handed
        # in by the pretraining command, as training imports nothing from preparation.
        self.prepare_data = prepare_data
        self.stop_signal: str | None = None
        self.rank = 0
        self.lock: RunLock | None = None

    # -- set-up ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[prior_dist] {message}", flush=True)

    def _on_signal(self, signum, _frame) -> None:
        """A stop signal: checkpoint at the next step boundary and stop. A second Ctrl-C
        (SIGINT) aborts at once, without a checkpoint; the last one stays."""
        if signum == signal.SIGINT:
            if self.stop_signal == "SIGINT":
                print(f"[prior_dist] rank {self.rank}: second Ctrl-C: aborting", flush=True)
                os._exit(130)
            self.log("Ctrl-C: checkpointing at the next step and stopping (again: abort now)")
        self.stop_signal = signal.Signals(signum).name

    def _on_launcher_gone(self, reason: str) -> None:
        print(
            f"[prior_dist] rank {self.rank}: {reason}; checkpointing at the next step and stopping",
            flush=True,
        )
        self.stop_signal = "launcher exit"

    def setup(self) -> None:
        self._start_process()
        self._check_resume_config()
        torch.manual_seed(self.recipe.train.seed)
        if self.prepare_data is not None:
            self.prepare_data(self.recipe.data, self.log)
        shards = shard_directory(self.recipe.data)
        self.tokenizer = load_training_tokenizer(
            self.recipe.data, shards, self.run_dir / RUN_TOKENIZER
        )
        if self.rank == 0:
            self._keep_tokenizer()
        self.resume_path = self._checkpoint_to_resume()
        self._check_global_batch()
        self._build()
        self.step, self.stage, self.resumed_from = 0, None, None
        self._resume()
        if self.rank == 0:
            self._write_resolved_config()
        logging = self.recipe.logging
        self.metrics = MetricsLogger(
            self.run_dir,
            self.rank,
            self.step,
            logging.report_to,
            self.audit_samples,
            self.total_steps if logging.progress else None,
            logging.wandb_project,
        )
        self.profiler = StepProfiler(
            logging.profile_steps, self.run_dir, self.device, self.rank, self.log
        )
        self.data_wait = DataWaitWatch(
            logging.data_wait_warn, logging.data_wait_window, self.loader.num_workers, self.log
        )
        ds = self.ds
        self.log(
            f"{self.world} rank(s) on {self.device.type}, ZeRO {ds.zero_stage}, "
            f"{ds.precision}, micro-batch {ds.micro_batch_size} x accumulation "
            f"{ds.gradient_accumulation_steps} x {self.world} ranks; {self.loader.num_workers} "
            f"loader workers; {self.steps_per_epoch} steps per epoch; stages end at steps "
            f"{[s.end for s in self.spans]}"
            + (
                f"; resumed from {self.resumed_from} (loaded in {self.load_seconds:.2f} s)"
                if self.resumed_from
                else ""
            )
        )

    def _start_process(self) -> None:
        """The stop signals, the process group, the run lock and this rank's pid file."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.device = device_for_local_rank()
        init_process_group(self.device, self.recipe.train.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._take_run_lock()
        (self.run_dir / PIDS).mkdir(parents=True, exist_ok=True)
        (self.run_dir / PIDS / f"rank{self.rank}.pid").write_text(str(os.getpid()))
        watch_runner(self._on_launcher_gone)

    def _check_resume_config(self) -> None:
        """Before anything is built: a run resuming from this directory's checkpoints must
        train what the saved run trained (decided on rank 0 for every rank); the changes it may
        make are listed."""
        refused: list[str] = []
        saved = self.run_dir / RESOLVED_CONFIG
        resuming = self.resume != "none" and saved.is_file()
        if self.rank == 0 and resuming and complete_checkpoints(self.run_dir):
            recipe = json.loads(saved.read_text()).get("recipe", {})
            recipe = upgrade_moved_fields(recipe, warn=False)
            refused, allowed = compare_recipes(recipe, self.recipe.to_dict())
            if allowed and not refused:
                self.log("resume: changed since the saved run: " + "; ".join(allowed))
        self._stop_unless_rank0_agrees(refusal(self.run_dir, refused) if refused else "")

    def _take_run_lock(self) -> None:
        """Rank 0 takes the run directory's lock before anything is written there; a run into
        a live directory stops at once, on every rank."""
        problem = ""
        if self.rank == 0:
            self.lock = RunLock(self.run_dir)
            try:
                self.lock.acquire(self.log)
            except RunDirInUse as err:
                self.lock, problem = None, str(err)
        self._stop_unless_rank0_agrees(problem)

    def _stop_unless_rank0_agrees(self, problem: str) -> None:
        """Raise rank 0's `problem` (a ValueError: exit 2) on every rank, told by one broadcast,
        so that no rank goes on to wait in a collective for ranks that stopped."""
        verdict = torch.tensor([float(bool(problem))], device=self.device)
        dist.broadcast(verdict, src=0)
        if verdict.item():
            raise ValueError(problem or "stopped: rank 0 refused to start (its message says why)")

    def _keep_tokenizer(self) -> None:
        """A copy of the tokenizer in the run directory: evaluation and export need no shards
        for it (written once, complete or absent)."""
        target = self.run_dir / RUN_TOKENIZER
        if target.is_dir():
            return
        tmp = self.run_dir / f".{RUN_TOKENIZER}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.tokenizer.save_pretrained(str(tmp))
        publish(tmp, target)

    def _build(self) -> None:
        """The model config for the tokenizer, the engine, the loader and the stage plan."""
        recipe, ds = self.recipe, self.ds
        self.model_cfg = recipe.model.for_vocabulary(len(self.tokenizer))
        if len(self.tokenizer) > self.model_cfg.text.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but text.vocab_size is "
                f"{self.model_cfg.text.vocab_size}: the tokenizer and the model disagree"
            )
        task = build_task(self.model_cfg, recipe.train.sync_batchnorm, self.device.type, self.world)
        if recipe.init_from:  # before the engine: ZeRO partitions what it is given
            self.log(initial_weights(task.model, recipe.init_from))
        compiled = prepare_for_device(task.model, self.device, recipe.train.compile, ds.zero_stage)
        self.compiled = bool(compiled)
        self.log(f"train.compile: {', '.join(compiled) if compiled else 'off (eager)'}")
        universal = ckpt.needs_universal(self.resume_path, self.world)
        self.engine = build_engine(task, recipe, ds, self.device.type, universal)
        self.loader = training_loader(
            recipe.data,
            self.tokenizer,
            ds.micro_batch_size,
            self.model_cfg.image.image_size,
            recipe.train.seed,
            self.rank,
            self.world,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader) // ds.gradient_accumulation_steps
        self.spans = plan_stages(recipe.train.stages, self.steps_per_epoch)
        self.total_steps = self.spans[-1].end
        if self.max_steps is not None:
            self.total_steps = min(self.total_steps, self.max_steps)
        self.runner = StepRunner(
            self.engine,
            self.loader,
            ds,
            self.device,
            precision_dtype(ds),
            recipe.train.seed,
            recipe.train.tie_noise_to_samples,
            recipe.train.max_nonfinite_steps,
            self.log,
        )

    def _checkpoint_to_resume(self) -> Path | None:
        """Incomplete checkpoints removed; the one to resume from (chosen before the engine is
        built: another number of ranks under ZeRO 1-3 needs an engine that loads universal)."""
        if self.rank == 0:
            ckpt.wait_for_writers(self.run_dir, self.log)
            for name in ckpt.remove_partial(self.run_dir):
                self.log(f"removed {name}: an incomplete checkpoint (a save that did not finish)")
        dist.barrier()
        return ckpt.choose_checkpoint(self.run_dir, self.resume, self.log)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: ranks x micro-batch x accumulation."""
        return self.world * self.ds.micro_batch_size * self.ds.gradient_accumulation_steps

    def _check_global_batch(self) -> None:
        """A resume with another global batch (samples per optimizer step): allowed, with a
        warning naming both, when the schedule is in steps (it is kept; the data continue from
        the same sample); refused when stages are in epochs (their steps would move)."""
        ds, path = self.ds, self.resume_path
        accumulation = ds.gradient_accumulation_steps
        saved = ckpt.saved_global_batch(path, accumulation) if path is not None else None
        if saved in (None, self.global_batch):
            return
        now = (
            f"{self.global_batch} ({self.world} ranks x micro-batch {ds.micro_batch_size} x "
            f"accumulation {accumulation})"
        )
        in_epochs = [
            f"train.stages.{i}"
            for i, stage in enumerate(self.recipe.train.stages)
            if stage.epochs is not None or stage.warmup_epochs is not None
        ]
        if in_epochs:
            raise ValueError(
                f"checkpoint {path} trained with a global batch of {saved} samples per step; "
                f"this run has {now}. The schedule is in epochs ({', '.join(in_epochs)}), and "
                f"its steps would move with the global batch: keep {saved} samples per step"
                f"{_keeping_batch(saved, self.world, ds.micro_batch_size, accumulation)}, or "
                "start a new run (--resume none, or another --run-dir)"
            )
        self.log(
            f"WARNING: checkpoint {path} trained with a global batch of {saved} samples per "
            f"step; this run has {now}. The schedule (in optimizer steps) is kept, so each "
            "step from here on sees that many samples; the data continue from the same sample"
        )

    def _resume(self) -> None:
        path = self.resume_path
        if path is None:
            return
        start = time.perf_counter()
        client, rank_state = ckpt.load_checkpoint(self.engine, path, self.log)
        self.load_seconds = time.perf_counter() - start
        self.step = int(client["step"])
        self.stage = client.get("stage")
        # On another number of ranks the position is rank 0's (it does not depend on the ranks).
        state = rank_state["loader"] if rank_state is not None else client["loader"]
        repeated = self.loader.load_state_dict(state, self.ds.gradient_accumulation_steps)
        if repeated:
            self.log(
                f"WARNING: the data position rounded down to whole steps of the new global "
                f"batch: {repeated} samples of epoch {self.loader.epoch} are served again"
            )
        if rank_state is not None:
            ckpt.set_rng_state(rank_state["rng"])
        self.resumed_from = str(path)

    def _write_resolved_config(self) -> None:
        resolved = {
            "recipe": self.recipe.to_dict(),
            "model": self.model_cfg.to_dict(),
            "deepspeed": engine_config(self.ds, self.recipe, self.device.type),
            "deepspeed_config_path": self.ds.path,
            "world_size": self.world,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.spans[-1].end,
            "stages": [
                {"stage": s.stage, "start": s.start, "steps": s.steps, "warmup": s.warmup}
                for s in self.spans
            ],
        }
        write_json(self.run_dir / RESOLVED_CONFIG, resolved)

    # -- the loop -------------------------------------------------------------------------
    def span_at(self, step: int) -> StageSpan:
        for span in self.spans:
            if step < span.end:
                return span
        return self.spans[-1]

    def run(self) -> dict:
        try:
            self.setup()
            try:
                return self._train()
            finally:
                self.runner.close()
                self.metrics.close()
                if self.compiled:
                    self.log(compile_summary())
        finally:
            if self.lock is not None:
                self.lock.release()

    def _enter_stage(self, span: StageSpan) -> None:
        """A fresh AdamW state at each stage start; the prototype bank's start in stage 2."""
        if span.stage == self.stage:
            return
        if self.stage is not None or self.step == span.start:
            reset_optimizer_state(self.engine)
            self.log(f"stage {span.stage} from step {self.step}")
            self.runner.start_bank = (
                span.stage == 2 and self.engine.module.bank_starts_from_sentences
            )
        self.stage = span.stage

    def _train(self) -> dict:
        train = self.recipe.train
        weights = self.recipe.stage_weights()
        self.last_save_time, last_saved_step = time.monotonic(), self.step
        self.pending: list[tuple] = []  # steps whose values are still on the device
        self.nonfinite_streak = 0
        self.engine.train()
        while self.step < self.total_steps:
            span = self.span_at(self.step)
            self._enter_stage(span)
            plan = stage_plan(span.stage, sentence_cap=train.sentence_cap, weights=weights)
            lr = learning_rate(span, self.step)
            set_learning_rate(self.engine, lr)
            self.profiler.before(self.step + 1)
            start = time.perf_counter()
            outcome = self.runner.train_step(self.step + 1, plan)
            self.step += 1
            step_time = time.perf_counter() - start
            self.profiler.after(self.step)
            self.data_wait.add(self.step, outcome.wait_s, step_time)
            digest = bank_digest(self.engine, self.ds.zero_stage) if self.audit_samples else None
            self.pending.append((plan, lr, outcome, step_time, digest, memory_mb(self.device)))
            every = self.recipe.eval.every_steps
            evaluating = bool(every and self.step % every == 0)
            if evaluating or self.step % self.recipe.logging.every == 0:
                self._flush_records(self.periodic_eval() if evaluating else None)
            stop, saved = self._save_if_due()
            if saved:
                last_saved_step = self.step
            if stop:
                self.profiler.finish(self.step)
                self.log(
                    f"stopping at step {self.step} after a signal; checkpoint saved, resume "
                    "with --resume auto"
                )
                (self.run_dir / PREEMPTED).write_text(str(self.step))
                return {"step": self.step, "stopped_by_signal": True}
        self.profiler.finish(self.step)
        if last_saved_step != self.step:
            self.save()
        (self.run_dir / PREEMPTED).unlink(missing_ok=True)
        result = {
            "step": self.step,
            "stopped_by_signal": False,
            "skipped": dict(self.runner.skipped),
        }
        if self.step >= self.spans[-1].end and self.recipe.eval.zero_shot:
            result["zero_shot"] = self.evaluate()
        return result

    def _save_if_due(self) -> tuple[bool, bool]:
        """Checkpoint after a stop signal on any rank, or on the step or time cadence (agreed
        by all ranks on the host); returns (a signal asked the run to stop, a checkpoint was
        saved)."""
        cadence = self.recipe.checkpoint
        due_time = (
            cadence.every_minutes is not None
            and self.rank == 0
            and time.monotonic() - self.last_save_time >= 60 * cadence.every_minutes
        )
        stop, timed = self.runner.vote([float(self.stop_signal is not None), float(due_time)])
        due_steps = cadence.every_steps is not None and self.step % cadence.every_steps == 0
        if not (stop or timed or due_steps):
            return False, False
        self.save(detached=bool(stop))
        self.last_save_time = time.monotonic()
        return bool(stop), True

    def _flush_records(self, evaluation: dict | None = None) -> None:
        """Read the pending steps' values from the device (one stacked transfer, one all-reduce
        on several ranks) and write their records; `evaluation` joins the newest one. A run of
        `train.max_nonfinite_steps` skipped steps aborts the run."""
        if not self.pending:
            return
        stacked = torch.stack([p[2].values for p in self.pending])
        if self.world > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        rows = (stacked / self.world).tolist()
        pending, self.pending = self.pending, []
        first = self.step - len(pending) + 1
        for i, ((plan, lr, outcome, step_time, digest, memory), row) in enumerate(
            zip(pending, rows)
        ):
            step = first + i
            values = dict(zip(VALUE_NAMES, row))
            skipped = values.pop("skipped") > 0
            record = self._record(step, plan, lr, outcome, step_time, values, skipped, memory)
            if i == len(pending) - 1 and evaluation:
                record.update(evaluation)
            self.metrics.step(record, outcome.keys, digest, memory)
            self._count_nonfinite(step, plan.stage, lr, skipped)

    def _count_nonfinite(self, step: int, stage: int, lr: float, skipped: bool) -> None:
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.runner.skipped["nonfinite_step"] += 1
        limit = self.recipe.train.max_nonfinite_steps
        self.log(
            f"step {step}: non-finite loss on some rank; optimizer step skipped "
            f"({self.nonfinite_streak} in a row, limit {limit})"
        )
        if self.nonfinite_streak >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} steps in a row gave a NaN or inf loss, the last at "
                f"step {step} (stage {stage}, lr {lr:.3g}); aborting. Lower the learning "
                "rate, check the data, or use bf16/fp32"
            )

    def _record(
        self,
        step: int,
        plan: StagePlan,
        lr: float,
        outcome: StepOutcome,
        step_time: float,
        values: dict[str, float],
        skipped: bool,
        memory: float,
    ) -> dict:
        losses = {
            n: (None if skipped else values[n])
            for n in ("total", *(n for n in LOSS_NAMES if plan.runs(n)))
        }
        gas = self.ds.gradient_accumulation_steps
        samples = self.ds.micro_batch_size * gas * self.world
        record = {
            "step": step,
            "stage": plan.stage,
            "epoch": outcome.epoch,
            "lr": lr,
            "loss": losses.pop("total"),
            **losses,
            "logit_scale": values["logit_scale"],
            "local_logit_scale": values["local_logit_scale"],
            "samples_per_s": samples / step_time,
            "data_wait_frac": outcome.wait_s / step_time,
            "step_time_s": step_time,
            "memory_mb": memory,
        }
        if skipped:
            record["skipped_nonfinite"] = True
        flops = self.runner.flops_per_micro.get(plan.stage)
        if flops is not None:
            record["mfu"] = flops * gas / step_time / peak_flops(self.device)
        return record

    def save(self, detached: bool = False) -> Path:
        """A checkpoint of this step; `detached` (a stop): written by a process that outlives
        this one (`runs/detached.py`)."""
        self._flush_records()  # metrics.jsonl holds every step a checkpoint holds
        client = {
            "step": self.step,
            "stage": self.stage,
            "epoch": self.loader.epoch,
            "loader": self.loader.state_dict(),
            "recipe": self.raw_recipe,
            "world_size": self.world,
            "global_batch": self.global_batch,
            "deepspeed_config": self.ds.raw,
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state()}
        start = time.perf_counter()
        path = ckpt.save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            client,
            rank_state,
            self.recipe.checkpoint.keep_last,
            detached,
        )
        how = ", written by a detached writer" if detached else ""
        self.log(f"checkpoint {path} ({time.perf_counter() - start:.2f} s{how})")
        return path

    # -- evaluation -----------------------------------------------------------------------
    def _loaded(self) -> LoadedModel:
        return LoadedModel(self.engine.module.model, self.tokenizer, "training")

    def periodic_eval(self) -> dict:
        """Zero-shot accuracy and retrieval recall on `eval.split` of the evaluation shards,
        for metrics.jsonl."""
        cfg = self.recipe.eval
        start = time.perf_counter()
        zero = self._zero_shot(cfg.split)
        self.engine.eval()
        try:
            found = retrieval(
                self._loaded(),
                self._eval_shards(),
                cfg.split,
                cfg.classes,
                batch_size=cfg.micro_batch_size,
                through_bank=cfg.bank,
            )
        finally:
            self.engine.train()
        accuracy = zero["combined"]["accuracy"]
        return {
            "eval_zero_shot_accuracy": None if math.isnan(accuracy) else accuracy,
            "eval_i2t_recall@5": found["image_to_text"]["recall@5"],
            "eval_t2i_recall@5": found["text_to_image"]["recall@5"],
            "eval_pairs": found["pairs"],
            "eval_time_s": time.perf_counter() - start,
        }

    def _eval_shards(self) -> str:
        """Where evaluation during and after training reads: the first local source of
        `data.path`, each sample once (the sources' training weights do not apply)."""
        return str(first_local_source(self.recipe.data))

    def _zero_shot(self, split: str) -> dict:
        """`python -m prior_dist.evaluate zero-shot`'s scoring on the evaluation shards."""
        cfg = self.recipe.eval
        self.engine.eval()
        try:
            return zero_shot(
                self._loaded(),
                self._eval_shards(),
                split,
                cfg.classes,
                PromptOptions((cfg.prompt,), through_bank=cfg.bank),
                cfg.local_weight,
                batch_size=cfg.micro_batch_size,
            )
        except ValueError as exc:  # e.g. no single-label image in a small split
            self.log(f"zero-shot on the {split} split skipped: {exc}")
            return {
                "images": 0,
                "combined": {"accuracy": math.nan},
                "global_only": {"accuracy": math.nan},
                "local_only": {"accuracy": math.nan},
                "chance": 1 / len(cfg.classes),
            }
        finally:
            self.engine.train()

    def evaluate(self) -> dict:
        """Zero-shot accuracy on the held-out split; every rank runs it (ZeRO-3 needs all)."""
        result = self._zero_shot(self.recipe.eval.final_split)
        if self.rank == 0:
            (self.run_dir / EVAL_RESULT).write_text(json.dumps(result, indent=2))
        accuracy, how = headline_accuracy(result)
        self.log(
            f"zero-shot accuracy on the {self.recipe.eval.final_split} split: "
            f"{accuracy:.3f} {how} (raw {result['combined']['accuracy']:.3f}, global only "
            f"{result['global_only']['accuracy']:.3f}) over {result['images']} images "
            f"(chance {result['chance']:.3f})"
        )
        return result
