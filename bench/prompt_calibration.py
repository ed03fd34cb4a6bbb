"""Zero-shot accuracy under reworded prompts, raw and with class offsets, over a seed sweep.

    python bench/prompt_calibration.py runs/sweep_iu --data shards/iu \
        --classes "Atelectasis,Cardiomegaly,Lung Lesion,Lung Opacity,Pleural Effusion" \
        --prompt "{} is observed" --prompt "There is {}."

For every `seed*` run of the sweep directory and every prompt: zero-shot on `--split` (test)
with the local weight chosen on the validation split (the default) and with the global score
alone (weight 0), each raw and with class offsets fitted on the validation split
(`evaluation.zero_shot.fit_class_offsets`); macro AUC beside them (offsets leave it as it is).
Prints mean ± sample sd over the seeds and each seed's value, the accuracy gap between the
prompts, and writes everything to `--out` (JSON). Read-only for the runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prior_dist.evaluation.zero_shot import PromptOptions, zero_shot  # noqa: E402
from prior_dist.runs.load import load_run  # noqa: E402

SETTINGS = {"chosen weight": None, "global only": 0.0}


def _measure(run: Path, data: str, split: str, classes, prompt: str) -> dict:
    loaded = load_run(run)
    loaded.model.eval()
    out = {}
    for name, weight in SETTINGS.items():
        result = zero_shot(loaded, data, split, classes, PromptOptions((prompt,)), weight)
        out[name] = {
            "raw": result["combined"]["accuracy"],
            "calibrated": result["calibrated"].get("accuracy"),
            "macro_auc": result["combined"]["macro_auc"],
            "local_weight": result["local_weight"],
            "majority": result["majority"],
        }
    return out


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--classes", required=True)
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    classes = args.classes.split(",")
    runs = sorted(p for p in args.sweep.glob("seed*") if p.is_dir())
    print(f"python {shlex.join(sys.argv)}")
    print(f"date {date.today()}  machine {platform.processor() or platform.machine()}")
    table = {
        p: {r.name: _measure(r, args.data, args.split, classes, p) for r in runs}
        for p in args.prompt
    }
    for setting in SETTINGS:
        for kind in ("raw", "calibrated", "macro_auc"):
            for prompt, seeds in table.items():
                values = [seeds[s][setting][kind] for s in seeds]
                print(f"{setting:14s} {kind:10s} {prompt!r:22s} {_spread(values)}")
        first, *others = args.prompt
        for other in others:
            for kind in ("raw", "calibrated"):
                gaps = [
                    table[first][s][setting][kind] - table[other][s][setting][kind]
                    for s in table[first]
                ]
                print(f"{setting:14s} {kind:10s} gap {first!r} - {other!r}: {_spread(gaps)}")
    if args.out:
        args.out.write_text(json.dumps({"command": sys.argv, "results": table}, indent=2))


if __name__ == "__main__":
    main()
