"""The pretraining loop: DeepSpeed engine, three-stage curriculum, checkpoints, faults.

One optimizer step = `gradient_accumulation_steps` good micro-batches on every rank. A
micro-batch whose loss is NaN/inf on any rank is skipped by all ranks (logged; N in a row
abort). SIGTERM/SIGUSR1 make every rank checkpoint at the next step boundary and exit cleanly.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from prior_dist.distributed import AllGather
from prior_dist.distributed.env import device_for_local_rank, init_process_group
from prior_dist.distributed.sync_bn import convert_sync_batchnorm
from prior_dist.losses import LocalGather
from prior_dist.models import build_model
from prior_dist.training import checkpoint as ckpt
from prior_dist.training.curriculum import LOSS_NAMES, stage_plan
from prior_dist.training.data import ensure_phantom_shards, load_training_tokenizer, training_loader
from prior_dist.training.ds_config import DeepSpeedSettings, engine_config
from prior_dist.training.metrics import MetricsLogger, memory_mb
from prior_dist.training.noise import sample_noise
from prior_dist.training.recipe import Recipe
from prior_dist.training.prototype_init import init_bank_from_batch
from prior_dist.training.schedule import StageSpan, learning_rate, plan_stages
from prior_dist.training.task import PriorTask

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches with a NaN or inf loss."""


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The innermost torch optimizer (under DeepSpeed's ZeRO / mixed-precision wrappers)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def reset_optimizer_state(engine) -> None:
    """A fresh AdamW state (moments and step counts) for a new stage; partitions stay."""
    base_optimizer(engine).state = collections.defaultdict(dict)


def set_learning_rate(engine, lr: float) -> None:
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr


class Trainer:
    def __init__(self, recipe: Recipe, ds: DeepSpeedSettings, run_dir: str | Path,
                 resume: str = "auto", max_steps: int | None = None,
                 audit_samples: bool = False, raw_recipe: dict | None = None):
        self.recipe, self.ds = recipe, ds
        self.run_dir = Path(run_dir)
        self.resume, self.max_steps, self.audit_samples = resume, max_steps, audit_samples
        self.raw_recipe = raw_recipe or recipe.to_dict()
        self.stop_signal: str | None = None

    # -- set-up ---------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[prior_dist] {message}", flush=True)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def setup(self) -> None:
        recipe, ds = self.recipe, self.ds
        self.device = device_for_local_rank()
        init_process_group(self.device, recipe.train.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "pids").mkdir(exist_ok=True)
        (self.run_dir / "pids" / f"rank{self.rank}.pid").write_text(str(os.getpid()))
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        torch.manual_seed(recipe.train.seed)
        shards = ensure_phantom_shards(recipe.data, recipe.train.seed, self.log)
        self.tokenizer = load_training_tokenizer(recipe.data, shards)
        cfg = recipe.model
        text = cfg.text
        if text.pretrained is None and text.vocab_size != len(self.tokenizer):
            text = replace(text, vocab_size=len(self.tokenizer))
        flag = recipe.train.activation_checkpointing
        cfg = cfg.replace(text=replace(text, activation_checkpointing=flag or
                                       text.activation_checkpointing),
                          image=replace(cfg.image, activation_checkpointing=flag or
                                        cfg.image.activation_checkpointing))
        self.model_cfg = cfg
        model = build_model(cfg)
        if recipe.train.sync_batchnorm:
            convert_sync_batchnorm(model, self.device.type)
        gather = AllGather() if self.world > 1 else LocalGather()
        task = PriorTask(model, gather)
        import deepspeed

        self.engine, *_ = deepspeed.initialize(
            model=task, model_parameters=[p for p in task.parameters() if p.requires_grad],
            config=engine_config(ds, recipe, self.device.type))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ds.precision,
                                                                          torch.float32)
        self.loader = training_loader(recipe.data, self.tokenizer, ds.micro_batch_size,
                                      cfg.image.image_size, recipe.train.seed, self.rank,
                                      self.world)
        steps_per_epoch = len(self.loader) // ds.gradient_accumulation_steps
        self.spans = plan_stages(recipe.train.stages, steps_per_epoch)
        self.total_steps = self.spans[-1].end
        if self.max_steps is not None:
            self.total_steps = min(self.total_steps, self.max_steps)
        self.step, self.stage, self.resumed_from = 0, None, None
        if self.rank == 0:
            for name in ckpt.remove_partial(self.run_dir):
                self.log(f"removed {name}: an incomplete checkpoint (a save that did not finish)")
        dist.barrier()
        path = ckpt.resolve_resume(self.run_dir, self.resume)
        if path is not None:
            self._restore(path)
        if self.rank == 0:
            resolved = {"recipe": self.recipe.to_dict(), "model": self.model_cfg.to_dict(),
                        "deepspeed": engine_config(ds, recipe, self.device.type),
                        "deepspeed_config_path": ds.path, "world_size": self.world,
                        "steps_per_epoch": steps_per_epoch, "total_steps": self.spans[-1].end,
                        "stages": [{"stage": s.stage, "start": s.start, "steps": s.steps,
                                    "warmup": s.warmup} for s in self.spans]}
            tmp = self.run_dir / "config.resolved.json.tmp"
            tmp.write_text(json.dumps(resolved, indent=2))
            os.replace(tmp, self.run_dir / "config.resolved.json")
        self.metrics = MetricsLogger(self.run_dir, self.rank, self.step,
                                     recipe.logging.tensorboard, self.audit_samples,
                                     self.total_steps if recipe.logging.progress else None)
        self.log(f"{self.world} rank(s) on {self.device.type}, ZeRO {ds.zero_stage}, "
                 f"{ds.precision}, micro-batch {ds.micro_batch_size} x accumulation "
                 f"{ds.gradient_accumulation_steps} x {self.world} ranks; {steps_per_epoch} "
                 f"steps per epoch; stages end at steps {[s.end for s in self.spans]}"
                 + (f"; resumed from {self.resumed_from} (loaded in {self.load_seconds:.2f} s)"
                    if self.resumed_from else ""))

    def _restore(self, path: Path) -> None:
        start = time.perf_counter()
        client, rank_state = ckpt.load_checkpoint(self.engine, path)
        self.load_seconds = time.perf_counter() - start
        self.step = int(client["step"])
        self.stage = client.get("stage")
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["loader"])
            ckpt.set_rng_state(rank_state["rng"])
        else:   # another world size (ZeRO-0): the loader position is world-size independent
            self.loader.load_state_dict({**client["loader"], "world_size": self.world})
        self.resumed_from = str(path)

    # -- the loop -------------------------------------------------------------------------
    def span_at(self, step: int) -> StageSpan:
        for span in self.spans:
            if step < span.end:
                return span
        return self.spans[-1]

    def _batches(self):
        while True:
            for batch in self.loader:
                yield batch

    def _agree(self, values: list[float], op=dist.ReduceOp.MAX) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.device.type == "cuda":
            t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def _to_device(self, batch: dict) -> dict:
        keys = ("image", "input_ids", "attention_mask", "sentence_index")
        out = {k: (batch[k].to(self.device, non_blocking=True) if k in keys else batch[k])
               for k in batch}
        # The engine holds bf16/fp16 weights under mixed precision: images follow them.
        out["image"] = out["image"].to(self.dtype)
        return out

    def run(self) -> dict:
        self.setup()
        try:
            return self._train()
        finally:
            self.metrics.close()

    def _train(self) -> dict:
        recipe, ds, engine = self.recipe, self.ds, self.engine
        gas = ds.gradient_accumulation_steps
        heads = self.model_cfg.heads
        inject = Counter(recipe.train.inject_nonfinite_steps)
        batches = self._batches()
        bad_streak, skipped = 0, Counter()
        last_save_time = time.monotonic()
        last_saved_step = self.step
        flops_per_micro = None
        init_bank = False
        engine.train()
        while self.step < self.total_steps:
            span = self.span_at(self.step)
            if span.stage != self.stage:
                if self.stage is not None or self.step == span.start:
                    reset_optimizer_state(engine)     # a fresh AdamW state for each stage
                    self.log(f"stage {span.stage} from step {self.step}")
                    init_bank = span.stage == 2 and heads.prototype_init == "sentences"
                self.stage = span.stage
            plan = stage_plan(span.stage, sentence_cap=recipe.train.sentence_cap)
            lr = learning_rate(span, self.step)
            set_learning_rate(engine, lr)
            start = time.perf_counter()
            wait = 0.0
            totals: dict[str, float] = collections.defaultdict(float)
            keys: list[str] = []
            good = 0
            while good < gas:
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                epoch = self.loader.epoch
                size = len(batch["key"])
                smallest = self._agree([float(size)], dist.ReduceOp.MIN)[0]
                if smallest < ds.micro_batch_size:
                    skipped["short_batch"] += 1
                    self.log(f"step {self.step + 1}: a rank's micro-batch lost samples to "
                             f"corrupt data ({int(smallest)} < {ds.micro_batch_size}); skipped "
                             "on every rank")
                    continue
                data = self._to_device(batch)
                if init_bank:
                    distinct = init_bank_from_batch(engine.module.model, data, recipe.train.seed,
                                                    ds.zero_stage)
                    self.log(f"prototype bank set from {distinct} distinct sentences")
                    init_bank = False
                noise = None
                if recipe.train.tie_noise_to_samples:
                    noise = sample_noise(batch, epoch, recipe.train.seed,
                                         int(batch["num_sentences"].max()), heads.num_queries,
                                         heads.num_prototypes, heads.embed_dim, self.device)
                if flops_per_micro is None and self.device.type == "cuda":
                    from torch.utils.flop_counter import FlopCounterMode

                    with FlopCounterMode(display=False) as counter:
                        out = engine(data, plan, noise)
                    flops_per_micro = 3 * counter.get_total_flops()
                else:
                    out = engine(data, plan, noise)
                loss = out["total"]
                if inject[self.step + 1] > 0:
                    inject[self.step + 1] -= 1
                    loss = loss * float("nan")
                finite = self._agree([float(torch.isfinite(loss.detach()).all())],
                                     dist.ReduceOp.MIN)[0]
                if not finite:
                    bad_streak += 1
                    skipped["nonfinite_loss"] += 1
                    self.log(f"step {self.step + 1}: non-finite loss on some rank; micro-batch "
                             f"skipped ({bad_streak} in a row, limit "
                             f"{recipe.train.max_nonfinite_steps})")
                    if bad_streak >= recipe.train.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{bad_streak} micro-batches in a row gave a NaN or inf loss at step "
                            f"{self.step + 1} (stage {span.stage}, lr {lr:.3g}); aborting. Lower "
                            "the learning rate, check the data, or use bf16/fp32")
                    continue
                bad_streak = 0
                engine.backward(loss)
                engine.step()
                good += 1
                keys += list(batch["key"])
                for name, value in out.items():
                    totals[name] += float(value.detach()) / gas
            self.step += 1
            step_time = time.perf_counter() - start
            record = self._record(span, epoch, lr, totals, step_time, wait, gas, flops_per_micro)
            every = recipe.eval.every_steps
            if every and self.step % every == 0:
                record.update(self.periodic_eval())
            self.metrics.step(record, keys, self._bank_digest() if self.audit_samples else None,
                              memory_mb(self.device))
            due_time = (recipe.checkpoint.every_minutes is not None and self.rank == 0 and
                        time.monotonic() - last_save_time >= 60 * recipe.checkpoint.every_minutes)
            stop, timed = self._agree([float(self.stop_signal is not None), float(due_time)])
            due_steps = (recipe.checkpoint.every_steps is not None
                         and self.step % recipe.checkpoint.every_steps == 0)
            if stop or timed or due_steps:
                self.save()
                last_save_time, last_saved_step = time.monotonic(), self.step
            if stop:
                self.log(f"stopping at step {self.step} after a signal; checkpoint saved, resume "
                         "with --resume auto")
                (self.run_dir / "PREEMPTED").write_text(str(self.step))
                return {"step": self.step, "stopped_by_signal": True}
        if last_saved_step != self.step:
            self.save()
        (self.run_dir / "PREEMPTED").unlink(missing_ok=True)
        result = {"step": self.step, "stopped_by_signal": False, "skipped": dict(skipped)}
        if self.step >= self.spans[-1].end and recipe.eval.zero_shot:
            result["zero_shot"] = self.evaluate()
        return result

    def _record(self, span, epoch, lr, totals, step_time, wait, gas, flops_per_micro) -> dict:
        names = ["total"] + [n for n in LOSS_NAMES if n in totals]
        averaged = self._agree([totals[n] for n in names], dist.ReduceOp.SUM)
        values = {n: v / self.world for n, v in zip(names, averaged)}
        scales = self.engine.module.model.logit_scales()
        samples = self.ds.micro_batch_size * gas * self.world
        scales = [float(s.detach()) for s in scales]
        record = {"step": self.step, "stage": span.stage, "epoch": epoch, "lr": lr,
                  "loss": values.pop("total"), **values,
                  "logit_scale": float(scales[0]), "local_logit_scale": float(scales[1]),
                  "samples_per_s": samples / step_time, "data_wait_frac": wait / step_time,
                  "step_time_s": step_time, "memory_mb": memory_mb(self.device)}
        if flops_per_micro is not None:
            name = torch.cuda.get_device_name(self.device)
            peak = float(os.environ.get("PRIOR_PEAK_FLOPS", 0)) or next(
                (v for k, v in PEAK_FLOPS.items() if k in name), math.nan)
            record["mfu"] = flops_per_micro * gas / step_time / peak
        return record

    def _bank_digest(self) -> str:
        """sha256 of this rank's prototype bank (the audit proves every rank holds the same)."""
        import hashlib

        import deepspeed

        weight = self.engine.module.model.prototype_bank.prototypes
        with deepspeed.zero.GatheredParameters([weight], enabled=self.ds.zero_stage == 3):
            data = weight.detach().float().cpu().contiguous().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()

    def save(self) -> Path:
        client = {"step": self.step, "stage": self.stage, "epoch": self.loader.epoch,
                  "loader": self.loader.state_dict(), "recipe": self.raw_recipe,
                  "world_size": self.world, "deepspeed_config": self.ds.raw}
        rank_state = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state()}
        start = time.perf_counter()
        path = ckpt.save_checkpoint(self.engine, self.run_dir, self.step, client, rank_state,
                                    self.recipe.checkpoint.keep_last)
        self.log(f"checkpoint {path} ({time.perf_counter() - start:.2f} s)")
        return path

    def periodic_eval(self) -> dict:
        """Zero-shot accuracy and retrieval recall on `eval.split`, for metrics.jsonl."""
        from prior_dist.evaluate import retrieval
        from prior_dist.evaluation.load import LoadedModel
        from prior_dist.training.data import data_sources

        recipe = self.recipe
        start = time.perf_counter()
        zero_shot = self._zero_shot(recipe.eval.split)
        self.engine.eval()
        try:
            found = retrieval(LoadedModel(self.engine.module.model, self.tokenizer, "training"),
                              data_sources(recipe.data), recipe.eval.split,
                              recipe.eval.classes)
        finally:
            self.engine.train()
        accuracy = zero_shot["paper_score"]["accuracy"]
        return {"eval_zero_shot_accuracy": None if accuracy != accuracy else accuracy,
                "eval_i2t_recall@5": found["image_to_text"]["recall@5"],
                "eval_t2i_recall@5": found["text_to_image"]["recall@5"],
                "eval_time_s": time.perf_counter() - start}

    def _zero_shot(self, split: str) -> dict:
        """`python -m prior_dist.evaluate zero-shot`'s scoring, on the first local source."""
        from prior_dist.data.loader import parse_sources
        from prior_dist.evaluate import zero_shot
        from prior_dist.evaluation.load import LoadedModel
        from prior_dist.training.data import data_sources

        recipe = self.recipe
        shards = next(s.location for s in parse_sources(data_sources(recipe.data))
                      if not s.remote)
        self.engine.eval()
        try:
            return zero_shot(LoadedModel(self.engine.module.model, self.tokenizer, "training"),
                             shards, split, recipe.eval.classes, (recipe.eval.prompt,),
                             recipe.eval.local_weight)
        except ValueError as exc:        # e.g. no single-label image in a small split
            self.log(f"zero-shot on the {split} split skipped: {exc}")
            return {"images": 0, "paper_score": {"accuracy": math.nan},
                    "global_only": {"accuracy": math.nan}, "chance": 1 / len(recipe.eval.classes)}
        finally:
            self.engine.train()

    def evaluate(self) -> dict:
        """Zero-shot accuracy on the held-out split; every rank runs it (ZeRO-3 needs all)."""
        recipe = self.recipe
        result = self._zero_shot(recipe.data.eval_split)
        if self.rank == 0:
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2))
        self.log(f"zero-shot accuracy on the {recipe.data.eval_split} split: "
                 f"{result['paper_score']['accuracy']:.3f} (global only "
                 f"{result['global_only']['accuracy']:.3f}) over {result['images']} images "
                 f"(chance {result['chance']:.3f})")
        return result
