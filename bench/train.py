"""Distributed training benchmark on CPU: 2 ranks, the `tiny` recipe, one run per ZeRO stage.

    python bench/train.py [--steps 40] [--micro 16] [--workers 2] [--out bench/results/train.json]

For ZeRO 0/1/2/3 (the real `deepspeed` launcher, `--num_gpus 2`, gloo): median step time after
a warm-up, peak memory per rank (max RSS), the data-wait fraction with `--workers` loader
workers per rank, and the time to save a checkpoint and to load it in a resumed run. Targets:
ZeRO-2 within 1.1x of ZeRO-0 step time; data wait < 5% with 2 workers.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pretrain_runs import ds_config, launch, metrics  # noqa: E402


def run_stage(
    stage: int, tmp: Path, shards: Path, steps: int, micro: int, workers: int, zero_extra: dict
) -> dict:
    run = tmp / f"zero{stage}"
    overrides = [
        f"train.stages.0.steps={steps}",
        "train.stages.1.steps=1",
        "train.stages.2.steps=1",
        f"data.workers={workers}",
        f"checkpoint.every_steps={steps}",
        "train.stages.0.warmup_steps=1",
        "data.phantom_studies=1600",
    ]
    config = ds_config(tmp, micro, stage)
    if zero_extra and stage > 0:
        raw = json.loads(config.read_text())
        raw["zero_optimization"].update(zero_extra)
        config.write_text(json.dumps(raw))
    proc = launch(
        2,
        config,
        run,
        shards,
        "--max-steps",
        str(steps),
        "--audit-samples",
        overrides=overrides,
        timeout=900,
    )
    saves = [float(x) for x in re.findall(r"checkpoint \S+ \(([\d.]+) s\)", proc.stdout)]
    resumed = launch(
        2, config, run, shards, "--max-steps", str(steps + 1), overrides=overrides, timeout=900
    )
    loads = [float(x) for x in re.findall(r"loaded in ([\d.]+) s", resumed.stdout)]
    lines = metrics(run)[:steps]
    body = lines[5:]  # after a warm-up
    memory = []
    for rank in range(2):
        audit = [
            json.loads(x) for x in (run / "samples" / f"rank{rank}.jsonl").read_text().splitlines()
        ]
        memory.append(max(a["memory_mb"] for a in audit))
    return {
        "zero_stage": stage,
        "step_time_s": statistics.median(r["step_time_s"] for r in body),
        "data_wait_frac": statistics.mean(r["data_wait_frac"] for r in body),
        "peak_memory_mb_per_rank": memory,
        "checkpoint_save_s": saves[-1] if saves else None,
        "checkpoint_load_s": loads[-1] if loads else None,
        "steps_timed": len(body),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument(
        "--zero-extra", default="{}", help="JSON merged into zero_optimization for stages >= 1"
    )
    parser.add_argument("--out", default="bench/results/train.json")
    args = parser.parse_args()
    print("command: python bench/train.py " + " ".join(sys.argv[1:]))
    print(
        f"date {date.today()}  machine {platform.processor() or platform.machine()}, "
        "2 CPU ranks (gloo), recipe tiny, fp32"
    )
    from prior_dist.data.run_data import load_training_tokenizer
    from prior_dist.preparation.provision import provide_phantom_shards
    from prior_dist.training.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards = tmp / "shards"
        recipe, _ = load_recipe("tiny", [f"data.path={shards}", "data.phantom_studies=1600"])
        provide_phantom_shards(recipe.data, log=lambda _: None)
        load_training_tokenizer(recipe.data, shards)
        rows = []
        for stage in [int(s) for s in args.stages.split(",")]:
            row = run_stage(
                stage,
                tmp,
                shards,
                args.steps,
                args.micro,
                args.workers,
                json.loads(args.zero_extra),
            )
            rows.append(row)
            print(
                f"ZeRO-{stage}: step {row['step_time_s'] * 1e3:.1f} ms, data wait "
                f"{100 * row['data_wait_frac']:.1f}%, peak memory per rank "
                f"{[round(m) for m in row['peak_memory_mb_per_rank']]} MB, checkpoint save "
                f"{row['checkpoint_save_s']} s, load {row['checkpoint_load_s']} s"
            )
    by_stage = {r["zero_stage"]: r for r in rows}
    ratio = None
    if 0 in by_stage and 2 in by_stage:
        ratio = by_stage[2]["step_time_s"] / by_stage[0]["step_time_s"]
        print(f"ZeRO-2 / ZeRO-0 step time: {ratio:.2f}x (target <= 1.1x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": str(date.today()),
                "args": vars(args),
                "rows": rows,
                "zero2_over_zero0": ratio,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
