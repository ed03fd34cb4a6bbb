"""`python -m prior_dist.sweep OUT --seeds 1,2,3 [options]`: one pretraining run per seed, each
evaluated, then every headline number as mean ± sample standard deviation over the seeds.

Seed S trains into `OUT/seed<S>` (`--set train.seed=S`, the `deepspeed` launcher, `--ranks`
CPU ranks or GPUs; an interrupted run resumes, a finished one ends at once) and is evaluated
(`--tasks`, default zero-shot and retrieval, with `--eval-args`) into
`OUT/seed<S>/eval/<task>.json`. Then `OUT/summary.json` and a table: mean ± sd, min and max
per number. Under a SLURM array each array task runs the seed of its index
(`sbatch --array=0-2 launch/slurm/seed_sweep.sbatch OUT --seeds 1,2,3 ...`); `--summary` alone
(a dependent job) writes the summary once all are done.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from prior_dist import pretrain
from prior_dist.atomic import write_json
from prior_dist.evaluate import main as evaluate
from prior_dist.evaluation.seeds import format_summary, read_sweep, summarize


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prior_dist.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="sweep directory: OUT/seed<S>/ per seed, OUT/summary.json")
    parser.add_argument("--seeds", default="1,2,3", help="pretraining seeds (default 1,2,3)")
    parser.add_argument(
        "--seed-index",
        type=int,
        default=None,
        help="run only this seed (default: $SLURM_ARRAY_TASK_ID minus $SLURM_ARRAY_TASK_MIN in "
        "an array job, else every seed)",
    )
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--config", default="zero2", help="DeepSpeed JSON (a shipped name or path)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per run (deepspeed --num_gpus)")
    parser.add_argument("--data", default=None, help="shard directory (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], help="recipe override (repeatable)")
    parser.add_argument("--tasks", default="zero-shot,retrieval", help="evaluate tasks")
    parser.add_argument(
        "--eval-args", default="", help="options for every evaluate task, e.g. '--split test'"
    )
    parser.add_argument("--summary", action="store_true", help="only summarise what is there")
    return parser


def _seed_index(args) -> int | None:
    if args.seed_index is not None:
        return args.seed_index
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        offset = int(os.environ.get("SLURM_ARRAY_TASK_MIN") or 0)
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - offset
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, seed: int, run_dir: Path) -> None:
    """One seed's pretraining run, under the deepspeed launcher; a failure names the seed."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher, "--num_gpus", str(args.ranks), "--master_port", str(_free_port())]
    cmd += [pretrain.__file__, "--config", args.config, "--recipe", args.recipe]
    cmd += ["--run-dir", str(run_dir), "--set", f"train.seed={seed}"]
    cmd += ["--data", args.data] if args.data else []
    for override in args.set:
        cmd += ["--set", override]
    print(f"sweep: seed {seed}: {shlex.join(cmd)}", flush=True)
    code = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    if code != 0:
        raise RuntimeError(f"seed {seed}: pretraining exited with {code} (log above; {run_dir})")


def evaluate_seed(args, run_dir: Path) -> None:
    """Each task's result into RUN_DIR/eval/TASK.json (a task already there is kept)."""
    for task in [t for t in args.tasks.split(",") if t]:
        out = run_dir / "eval" / f"{task}.json"
        if out.is_file():
            continue
        argv = [task, "--checkpoint", str(run_dir), "--no-baseline", "--out", str(out)]
        if evaluate([*argv, *shlex.split(args.eval_args)]) != 0:
            raise RuntimeError(f"{run_dir}: evaluate {task} failed (message above)")


def write_summary(args) -> dict:
    tasks = [t for t in args.tasks.split(",") if t]
    per_seed = read_sweep(args.out, tasks)
    summary = {"seeds": sorted(per_seed), "numbers": summarize(per_seed)}
    write_json(Path(args.out) / "summary.json", summary, indent=1)
    print("\n".join(format_summary(summary["numbers"])))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    index = _seed_index(args)
    try:
        if not args.summary:
            if index is not None and not 0 <= index < len(seeds):
                raise ValueError(f"seed index {index}: --seeds has {len(seeds)} seeds")
            for seed in seeds if index is None else [seeds[index]]:
                run_dir = Path(args.out) / f"seed{seed}"
                train(args, seed, run_dir)
                evaluate_seed(args, run_dir)
        if args.summary or index is None:
            write_summary(args)
            print(f"sweep: {Path(args.out) / 'summary.json'}")
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
