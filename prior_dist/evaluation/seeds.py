"""Results over pretraining seeds: mean, sample standard deviation, min and max of each headline
number of each task, from the `evaluate` result files of one run per seed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from prior_dist.schema import dotted

# Per task: the dotted keys of the `pretrained` result summarised over seeds (those present).
HEADLINES = {
    "zero-shot": (
        "combined.accuracy",
        "global_only.accuracy",
        "local_only.accuracy",
        "combined.macro_auc",
        "global_only.macro_auc",
        "local_only.macro_auc",
        "local_weight",
        "majority",
        "chance",
        "images",
    ),
    "retrieval": (
        "image_to_text.recall@1",
        "image_to_text.recall@5",
        "image_to_text.recall@10",
        "text_to_image.recall@1",
        "text_to_image.recall@5",
        "text_to_image.recall@10",
        "image_to_text.precision@5",
        "pairs",
    ),
}


def _number(result: dict, path: str) -> float | None:
    value = dotted(result, path)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(per_seed: dict[str, dict[str, dict]]) -> dict:
    """`{seed: {task: pretrained result}}` -> `{task: {key: {mean, std, min, max, seeds,
    values}}}`; `std` is the sample standard deviation (None for one seed)."""
    tasks = sorted({t for results in per_seed.values() for t in results})
    summary: dict = {}
    for task in tasks:
        for key in HEADLINES.get(task, ()):
            values = {
                seed: _number(results[task], key)
                for seed, results in sorted(per_seed.items())
                if task in results
            }
            values = {s: v for s, v in values.items() if v is not None and v == v}
            if not values:
                continue
            numbers = list(values.values())
            summary.setdefault(task, {})[key] = {
                "mean": statistics.fmean(numbers),
                "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
                "min": min(numbers),
                "max": max(numbers),
                "seeds": len(numbers),
                "values": values,
            }
    return summary


def read_sweep(out: str | Path, tasks) -> dict[str, dict[str, dict]]:
    """`{seed: {task: pretrained result}}` from `OUT/seed<S>/eval/<task>.json`."""
    per_seed: dict[str, dict[str, dict]] = {}
    for run in sorted(Path(out).glob("seed*")):
        for task in tasks:
            path = run / "eval" / f"{task}.json"
            if path.is_file():
                result = json.loads(path.read_text())
                per_seed.setdefault(run.name[4:], {})[task] = result.get("pretrained", result)
    return per_seed


def format_summary(summary: dict) -> list[str]:
    """One line per number: `task key  mean ± std  [min, max]  (n seeds)`."""
    lines = []
    for task, numbers in summary.items():
        for key, s in numbers.items():
            spread = "" if s["std"] is None else f" ± {s['std']:.3f}"
            lines.append(
                f"{task:<10} {key:<28} {s['mean']:.3f}{spread}  [{s['min']:.3f}, "
                f"{s['max']:.3f}]  ({s['seeds']} seeds)"
            )
    return lines
