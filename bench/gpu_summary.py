"""The GPU suite's results against the targets, as one JSON and a printed table.

    python bench/gpu_summary.py WORK_DIR [--out summary.json]

WORK_DIR is what `bench/gpu_suite.sh` wrote: steps.jsonl, paper_{bf16,fp16}/metrics.jsonl,
kernels.json, heads.json, eval_*.json. Training numbers are medians over each stage's steps after
its first two (the first step of a stage counts FLOPs and warms up kernels); peak memory is the
largest `memory_mb` of the run (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TARGETS = {
    "kernel_speedup": 2.0,  # Triton vs eager at the word-level shapes, at least
    "kernel_memory": 0.25,  # Triton's peak memory over eager's, at most
    "heads_speedup": 5.0,  # batched heads vs per-sample on the GPU, at least
    "samples_per_s_bf16": 1500.0,  # paper recipe on one H200, stage 3, at least
    "data_wait": 0.05,  # fraction of step time waiting for the loader, at most
}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training(run: Path) -> dict | None:
    """Per-stage medians of one paper run's metrics.jsonl."""
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    rows = [r for r in rows if "samples_per_s" in r]
    stages = {}
    for stage in sorted({r["stage"] for r in rows}):
        steady = [r for r in rows if r["stage"] == stage][2:]
        if not steady:
            continue
        stages[stage] = {
            "steps": len(steady),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "step_time_s": statistics.median(r["step_time_s"] for r in steady),
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady),
            "mfu": statistics.median(r.get("mfu", float("nan")) for r in steady),
        }
    peak = max((r["memory_mb"] for r in rows), default=None)
    return {"stages": stages, "peak_memory_mib": peak, "steps_logged": len(rows)}


def kernels(data: dict | None) -> list[dict]:
    rows = []
    for row in (data or {}).get("results", []):
        rows.append(
            {
                "case": row["case"],
                "shape": row["shape"],
                **{k: row[k]["ms"] for k in ("eager", "compile", "triton") if k in row},
                "speedup_vs_eager": row.get("speedup_vs_eager"),
                "memory_vs_eager": row.get("memory_vs_eager"),
                "triton_max_rel_diff": row.get("triton", {}).get("max_rel_diff_vs_eager"),
            }
        )
    return rows


def verdicts(summary: dict) -> dict:
    """Each target: the measured value and met / missed (None where it was not measured)."""
    out = {}
    word = [r for r in summary["kernels"] if "word" in r["case"] and r.get("speedup_vs_eager")]
    if word:
        speed = min(r["speedup_vs_eager"] for r in word)
        memory = max(r["memory_vs_eager"] or float("inf") for r in word)
        out["kernel_speedup_min"] = [speed, speed >= TARGETS["kernel_speedup"]]
        out["kernel_memory_max"] = [memory, memory <= TARGETS["kernel_memory"]]
    heads = (summary["heads"] or {}).get("paper_heads", {})
    if "speedup" in heads:
        out["heads_speedup"] = [heads["speedup"], heads["speedup"] >= TARGETS["heads_speedup"]]
    for precision, run in summary["training"].items():
        if run and run["stages"]:
            last = run["stages"][max(run["stages"])]
            if precision == "bf16":
                value = last["samples_per_s"]
                out["samples_per_s_bf16"] = [value, value >= TARGETS["samples_per_s_bf16"]]
            wait = max(s["data_wait_frac"] for s in run["stages"].values())
            out[f"data_wait_{precision}"] = [wait, wait <= TARGETS["data_wait"]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    steps = []
    if (args.work / "steps.jsonl").is_file():
        steps = [json.loads(x) for x in (args.work / "steps.jsonl").read_text().splitlines()]
    summary = {
        "steps": steps,
        "training": {
            p: training(args.work / f"paper_{p}")
            for p in ("bf16", "fp16", "fp32")
            if (args.work / f"paper_{p}").is_dir()
        },
        "kernels": kernels(_read_json(args.work / "kernels.json")),
        "heads": _read_json(args.work / "heads.json"),
        "eval": {path.stem: _read_json(path) for path in sorted(args.work.glob("eval_*.json"))},
        "targets": TARGETS,
    }
    summary["verdicts"] = verdicts(summary)
    text = json.dumps(summary, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    for precision, run in summary["training"].items():
        for stage, s in ((run or {}).get("stages") or {}).items():
            print(
                f"paper {precision} stage {stage}: {s['samples_per_s']:.0f} samples/s, "
                f"MFU {s['mfu']:.3f}, step {s['step_time_s'] * 1e3:.0f} ms, "
                f"data wait {100 * s['data_wait_frac']:.1f}%"
            )
        if run:
            print(f"paper {precision}: peak memory {run['peak_memory_mib']} MiB")
    for name, (value, met) in summary["verdicts"].items():
        print(f"target {name}: {value:.3f} {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
