"""Host overhead of one training step: the `paper` topology at toy widths on one CPU rank.

    python bench/step_overhead.py [--config configs/paper_bf16.json] [--batch 16]
        [--steps 6] [--warmup 3] [--set SECTION.FIELD=VALUE ...] [--out bench/results/x.json]

The model keeps the paper's topology (ResNet-50's 3/4/6/3 bottlenecks, a 12-layer BERT, the
8-layer sentence decoder, 512 prototypes, 16 queries, max 256 tokens) at widths where the
arithmetic is negligible, so the step's time is what the host spends enqueueing it. It trains
through the real `Trainer` set-up, DeepSpeed engine and step (one gloo rank, phantom shards), and
per curriculum stage reports, as medians over `--steps` steps after an uncounted warm-up of
`max(--warmup, 4)` steps (each of the 4 replayed batches at least once, so that torch.compile
compiles there):
- host ms per optimizer step;
- ops dispatched in the forward, the backward, the optimizer step (DeepSpeed's `step()`),
  `data` (agreeing on and moving the batch, its geometry) and the rest of the step;
- host syncs per step (`prior_dist.testing.dispatch_count`) by phase and kind, from the batch
  on the device to the end of the optimizer step (reads of the loader's host tensors, which
  cost nothing on a GPU, are reported apart);
- `profiled_ops`: the aten ops the host dispatched in one step, counted by torch.profiler
  (top-level ops only). Unlike the dispatch-mode counter, under which torch.compile runs its
  modules eagerly, the profiler leaves compiled graphs compiled: this is the count that shows
  what `train.compile` saves.
`--with SECTION.FIELD=VALUE` applies to this tree's run only: `--compare HEAD --with
train.compile=true` measures eager and compiled side by side.
On a GPU, these ops and syncs are what keep the device waiting: compare configs side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prior_dist.preparation.provision import provide_phantom_shards  # noqa: E402
from prior_dist.task import stage_plan  # noqa: E402
from prior_dist.testing.dispatch_count import StepCounter  # noqa: E402
from prior_dist.training.ds_config import read_deepspeed_config  # noqa: E402
from prior_dist.training.recipe import CONFIG_DIR, load_recipe  # noqa: E402
from prior_dist.training.trainer import Trainer  # noqa: E402

# The paper topology at toy widths (what --set may change further).
TOY_PAPER = [
    "model.text.pretrained=null",
    "model.text.hidden_size=24",
    "model.text.num_heads=12",
    "model.text.intermediate_size=48",
    "model.text.dropout=0.0",
    "model.image.image_size=64",
    "model.image.width=4",
    "model.heads.embed_dim=24",
    "model.heads.decoder_intermediate=48",
    "model.heads.decoder_dropout=0.0",
    "model.heads.image_decoder_widths=[8, 8, 8, 8, 8]",
    "data.tokenizer=auto",
    "data.vocab_size=800",
    "data.phantom_studies=200",
    "data.phantom_image_size=64",
    "data.phantom_shard_size=64",
    "data.workers=0",
    "logging.progress=false",
    "logging.data_wait_warn=null",
    "eval.zero_shot=false",
    "checkpoint.every_steps=null",
    "checkpoint.every_minutes=null",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replay(batches: list[dict]):
    """The loaded batches again and again (the loader's time is not the step's)."""
    while True:
        yield from batches


class _OldPhases:
    """For a commit before `StepRunner.phase` (--compare): the engine's forward, backward and
    step filed under their phases; everything else in its step counts as the step's."""

    def __init__(self, engine, counter: StepCounter):
        for attr, phase in (
            ("forward", "forward"),
            ("backward", "backward"),
            ("step", "optimizer"),
        ):
            original = getattr(engine, attr)

            def wrapped(*args, _original=original, _phase=phase, **kwargs):
                with counter.phase(_phase):
                    return _original(*args, **kwargs)

            setattr(engine, attr, wrapped)


def _step_function(runner, counter: StepCounter):
    if hasattr(runner, "train_step"):
        runner.phase = counter.phase
        return runner.train_step
    _OldPhases(runner.engine, counter)
    return lambda step, plan: runner.run(step, plan, 1e-6, plan.stage)


def profiled_ops(train_step, step: int, plan) -> int:
    """aten ops dispatched by the host in one step, not counting those called inside another."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(step, plan)
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def measure(trainer: Trainer, steps: int, warmup: int) -> dict:
    runner, recipe = trainer.runner, trainer.recipe
    counter = StepCounter()
    train_step = _step_function(runner, counter)
    iterator = iter(trainer.loader)
    batches = [next(iterator) for _ in range(4)]
    runner.batches = _replay(batches)
    results = {}
    step = 0
    for stage in (1, 2, 3):
        plan = stage_plan(stage, sentence_cap=recipe.train.sentence_cap)
        ops, syncs, kinds, data_syncs = [], [], [], []
        # Uncounted warm-up over every replayed batch: torch.compile runs eagerly under the
        # dispatch-mode counter, so its compilation (one graph per batch shape) happens here.
        for _ in range(max(warmup, len(batches))):
            step += 1
            train_step(step, plan)
        for _ in range(steps):
            step += 1
            counter.clear()
            with counter:
                train_step(step, plan)
            ops.append(dict(counter.ops))
            # The region of the step after its batch is on the device; "data" is host
            # work on host tensors (the loader's batch), free of device waits on a GPU.
            syncs.append(counter.syncs_outside("data"))
            data_syncs.append(counter.total_syncs - syncs[-1])
            kinds.append({p: dict(c) for p, c in counter.syncs_in.items() if p != "data"})
        # The counter's own cost inflates the time: time the same steps again uncounted.
        plain = []
        for _ in range(steps):
            step += 1
            start = time.perf_counter()
            train_step(step, plan)
            plain.append(time.perf_counter() - start)
        step += 1
        profiled = profiled_ops(train_step, step, plan)
        phases = ("data", "forward", "backward", "optimizer", "step")
        results[f"stage{stage}"] = {
            "host_ms": 1e3 * statistics.median(plain),
            "ops": {p: int(statistics.median(o.get(p, 0) for o in ops)) for p in phases},
            "ops_total": int(statistics.median(sum(o.values()) for o in ops)),
            "profiled_ops": profiled,
            "syncs": int(statistics.median(syncs)),
            "sync_kinds": kinds[len(kinds) // 2],
            "data_syncs_host_tensors": int(statistics.median(data_syncs)),
            "top_ops": dict(counter.op_names.most_common(12)),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG_DIR / "paper_bf16.json"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--with",
        dest="candidate",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="with --compare: a setting for this tree's run only",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="REV",
        help="also measure git revision REV's code (unpacked with git archive) in the same run, "
        "with REV's own copy of --config",
    )
    args = parser.parse_args()
    if args.compare:
        compare(args)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["MASTER_PORT"] = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        raw = json.loads(Path(args.config).read_text())
        raw["train_micro_batch_size_per_gpu"] = args.batch
        config = Path(tmp, "ds.json")
        config.write_text(json.dumps(raw))
        settings = [*TOY_PAPER, f"data.path={tmp}/shards", *args.overrides, *args.candidate]
        recipe, _ = load_recipe("paper", settings)
        recipe = dataclasses.replace(recipe, deepspeed_expect={})
        trainer = Trainer(
            recipe,
            read_deepspeed_config(config),
            Path(tmp, "run"),
            resume="none",
            prepare_data=provide_phantom_shards,
        )
        trainer.setup()
        trainer.engine.train()
        try:
            results = measure(trainer, args.steps, args.warmup)
        finally:
            trainer.runner.close()
            trainer.metrics.close()
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": "python " + " ".join(sys.argv),
        "config": args.config,
        "batch": args.batch,
        "stages": results,
    }
    for name, r in results.items():
        ops = r["ops"]
        print(
            f"{name}: host {r['host_ms']:.1f} ms/step; ops {r['ops_total']} (forward "
            f"{ops['forward']}, backward {ops['backward']}, optimizer {ops['optimizer']}, data "
            f"{ops['data']}, rest {ops['step']}); profiled ops {r['profiled_ops']}; host syncs "
            f"{r['syncs']} {r['sync_kinds']}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


def compare(args) -> None:
    """This benchmark on REV's code and on this tree's, one after the other, printed side by
    side with the ratios."""
    repo = Path(__file__).resolve().parents[1]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="step_overhead_rev_") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", args.compare], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        # This script and its counter run on REV's code (it may predate both).
        for part in ("bench/step_overhead.py", "prior_dist/testing/dispatch_count.py"):
            shutil.copy(repo / part, Path(tmp, part))
        config = Path(args.config).resolve()
        relative = config.relative_to(repo.resolve()) if config.is_relative_to(repo) else None
        for name, root in ((args.compare, Path(tmp)), ("this tree", repo)):
            cfg = str(root / relative) if relative else str(config)
            out = Path(tmp, f"{len(runs)}.json")
            cmd = [sys.executable, str(root / "bench/step_overhead.py"), "--config", cfg]
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup), "--out", str(out)]
            cmd += [a for s in args.overrides for a in ("--set", s)]
            if root == repo:
                cmd += [a for s in args.candidate for a in ("--with", s)]
            env = dict(os.environ, PYTHONPATH=str(root))
            subprocess.run(cmd, check=True, env=env, cwd=root, stdout=subprocess.DEVNULL)
            runs[name] = json.loads(out.read_text())
    before, after = runs[args.compare], runs["this tree"]
    table = {}
    for stage in after["stages"]:
        b, a = before["stages"][stage], after["stages"][stage]
        table[stage] = {
            "host_ms": [round(b["host_ms"], 1), round(a["host_ms"], 1)],
            "ops": [b["ops_total"], a["ops_total"]],
            "profiled_ops": [b.get("profiled_ops"), a["profiled_ops"]],
            "ops_by_phase": [b["ops"], a["ops"]],
            "syncs": [b["syncs"], a["syncs"]],
            "host_ms_ratio": round(a["host_ms"] / b["host_ms"], 3),
            "ops_ratio": round(a["ops_total"] / b["ops_total"], 3),
        }
        print(
            f"{stage}: host ms {b['host_ms']:.1f} -> {a['host_ms']:.1f} "
            f"({a['host_ms'] / b['host_ms']:.2f}x); ops {b['ops_total']} -> {a['ops_total']} "
            f"({a['ops_total'] / b['ops_total']:.2f}x); profiled ops {b.get('profiled_ops')} -> "
            f"{a['profiled_ops']}; host syncs {b['syncs']} -> {a['syncs']}"
        )
    record = {
        "date": date.today().isoformat(),
        "machine": after["machine"],
        "command": "python " + " ".join(sys.argv),
        "compared": [args.compare, " ".join(["this tree", *args.candidate])],
        "stages": table,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
