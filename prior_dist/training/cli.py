"""Command line of `launch/pretrain.py` (DeepSpeed launcher, torchrun or srun)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from prior_dist.distributed.env import adopt_slurm_environment
from prior_dist.evaluation.zero_shot import headline_accuracy
from prior_dist.runs.checkpoints import CheckpointWriteError
from prior_dist.runs.layout import EVAL_RESULT
from prior_dist.training.ds_config import check_against_recipe, read_deepspeed_config
from prior_dist.training.recipe import CONFIG_DIR, load_recipe
from prior_dist.training.trainer import NonFiniteLossError, Trainer

EXIT_CONFIG, EXIT_COLLECTIVE, EXIT_NONFINITE, EXIT_SAVE = 2, 3, 4, 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/pretrain.py",
        description="Pretrain PRIOR. Run under `deepspeed`, `torchrun` or `srun`; with no options "
        "it trains the demo recipe on phantom shards (generated on first use).",
    )
    parser.add_argument(
        "--config",
        default=str(CONFIG_DIR / "default.json"),
        help="DeepSpeed JSON: micro-batch, accumulation, precision, ZeRO stage; a path, or the "
        "name of a shipped one (default: ZeRO-0, bf16 autocast on a GPU, fp32 on a CPU; zero0 "
        ".. zero3, zero2_bf16, zero2_offload, paper_fp16, paper_bf16)",
    )
    parser.add_argument("--recipe", default="demo", help="demo | paper | tiny | PATH.yaml")
    parser.add_argument("--data", default=None, help="shard directory (sets data.path)")
    parser.add_argument(
        "--run-dir", default=None, help="default: runs/<recipe> in the working directory"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop at this global optimizer step (a checkpoint is saved)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a recipe field (repeatable)",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (latest complete checkpoint in the run dir) | none | PATH",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved recipe (every field --set can change) as YAML and exit",
    )
    parser.add_argument(
        "--audit-samples",
        action="store_true",
        help="write RUN_DIR/samples/rank{R}.jsonl: the sample keys of every step",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the DeepSpeed launcher
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    return args


_PEER_SIGNS = (
    "gloo",
    "nccl",
    "connection",
    "closed by peer",
    "timed out",
    "timeout",
    "broken pipe",
)


def runtime_failure(err: RuntimeError) -> str:
    """What a RuntimeError means for the user: a collective's failure (gloo/NCCL, a connection
    reset, a timeout: a peer has probably died) or an error in this rank's own computation."""
    text = str(err)
    if isinstance(err, dist.DistError) or any(s in text.lower() for s in _PEER_SIGNS):
        return (
            "a collective operation failed; a peer rank has probably died (see the launcher's "
            f"report of which one): {text}"
        )
    return f"the training step failed here (a bug or an unsupported setting, not a peer): {text}"


def main(argv: list[str] | None = None, prepare_data=None) -> int:
    """The pretraining command. `prepare_data(data_config, log)` makes the data a recipe asks
    to be generated (`prior_dist.pretrain` hands in the phantom shards' maker)."""
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        adopt_slurm_environment()
        overrides = list(args.overrides)
        if args.data:
            overrides.insert(0, f"data.path={args.data}")
        recipe, raw = load_recipe(args.recipe, overrides)
        if args.print_config:
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return 0
        if args.resume not in ("auto", "none") and not Path(args.resume).is_dir():
            raise ValueError(f"--resume {args.resume}: no such checkpoint directory")
        ds = read_deepspeed_config(shipped_config(args.config))
        # Refused here, before any process group starts.
        check_against_recipe(ds, recipe, "cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir = Path(args.run_dir or Path("runs") / recipe.name)  # from the working directory
    trainer = Trainer(
        recipe, ds, run_dir, args.resume, args.max_steps, args.audit_samples, raw, prepare_data
    )
    code = 0
    try:
        result = trainer.run()
        if getattr(trainer, "rank", 0) == 0:
            print(run_summary(result, run_dir), flush=True)
    except ValueError as err:
        print(f"pretrain: rank {rank}: error: {err}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    except NonFiniteLossError as err:
        print(f"pretrain: rank {rank}: {err}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    except CheckpointWriteError as err:
        print(f"pretrain: {err}", file=sys.stderr, flush=True)
        code = EXIT_SAVE
    except RuntimeError as err:
        print(f"pretrain: rank {rank}: {runtime_failure(err)}", file=sys.stderr, flush=True)
        traceback.print_exc()
        code = EXIT_COLLECTIVE
    finally:
        if dist.is_available() and dist.is_initialized() and code == 0:
            dist.destroy_process_group()
    return code


def shipped_config(value: str) -> str:
    """`--config`: a path as given, or the name of a DeepSpeed config shipped with the package."""
    shipped = CONFIG_DIR / f"{value.removesuffix('.json')}.json"
    if not Path(value).exists() and "/" not in value and shipped.is_file():
        return str(shipped)
    return value


def run_summary(result: dict, run_dir: Path) -> str:
    """What the run did, in a few lines, and the commands that take it further."""
    run = shlex.quote(str(run_dir))
    if result.get("stopped_by_signal"):
        return (
            f"[prior_dist] stopped at step {result['step']} by a signal; checkpoint saved. "
            f"Resume with the same command (--resume auto). Run directory: {run_dir}"
        )
    skipped = result.get("skipped") or {}
    lines = [
        f"[prior_dist] done at step {result['step']}; skipped: "
        + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "nothing")
    ]
    if "zero_shot" in result:  # the whole result is in RUN_DIR/eval.json
        zero = result["zero_shot"]
        accuracy, how = headline_accuracy(zero)
        how = "" if how == "raw" else f" {how} (raw {zero['combined']['accuracy']:.3f})"
        lines.append(
            f"[prior_dist] zero-shot accuracy {accuracy:.3f}{how} over "
            f"{zero['images']} images (chance {zero['chance']:.3f}); details in "
            f"{run_dir / EVAL_RESULT}"
        )
    lines += [
        f"[prior_dist] run directory {run_dir}; next:",
        f"  python -m prior_dist.evaluate linear-probe --checkpoint {run}",
        f"  python -m prior_dist.evaluate retrieval --checkpoint {run}",
        f"  python -m prior_dist.export --checkpoint {run} --out {run}/export",
        f"  python -m prior_dist.visualize curves --run {run} --out {run}/figures",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
