"""Fine-tuning step time of the dense downstream heads, measured side by side in one run.

    python bench/dense_heads.py [--steps 20] [--threads 2] [--out bench/results/dense_heads.json]

On the demo recipe's image tower (32 wide, 128 px; speed does not depend on the weights, so
they are random), frozen encoder: one optimizer step of the segmentation decoder (batch 16),
RetinaNet and Faster R-CNN (batch 8, the evaluate defaults; Faster R-CNN with the reduced
proposal counts `build_detector` uses). Images and boxes are random. Two warm-up steps, then
the median of `--steps` timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prior_dist.evaluation.detection import build_detector  # noqa: E402
from prior_dist.evaluation.segmentation import SegmentationModel, segmentation_loss  # noqa: E402
from prior_dist.models import build_model  # noqa: E402
from prior_dist.training.recipe import load_recipe  # noqa: E402


def _median_step(step, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/dense_heads.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe, _ = load_recipe("demo", [])
    tower = build_model(recipe.model).image
    size = recipe.model.image.image_size
    g = torch.Generator().manual_seed(0)

    def optimizer_step(model, loss_fn):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4)

        def step():
            loss = loss_fn(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    images16 = torch.randn(16, 1, size, size, generator=g)
    masks16 = torch.rand(16, 8, size, size, generator=g) > 0.9
    seg = SegmentationModel(tower, size, 8).train()
    rows = {
        "segmentation": _median_step(
            optimizer_step(seg, lambda m: segmentation_loss(m(images16), masks16)), args.steps
        )
    }
    images8 = list(torch.randn(8, 1, size, size, generator=g))
    xy = torch.rand(8, 2, 2, generator=g) * size * 0.6
    targets = [
        {"boxes": torch.cat([xy[i], xy[i] + size * 0.3], 1), "labels": torch.tensor([1, 2])}
        for i in range(8)
    ]
    for kind in ("retinanet", "faster_rcnn"):
        detector = build_detector(tower, size, 8, kind).train()
        rows[kind] = _median_step(
            optimizer_step(detector, lambda m: sum(m(images8, targets).values())), args.steps
        )
    print(
        f"date {date.today()}  machine {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, demo recipe tower ({size} px), frozen encoder"
    )
    for name, seconds in rows.items():
        print(f"{name:<13} {seconds * 1e3:8.1f} ms per step")
    ratio = rows["faster_rcnn"] / rows["retinanet"]
    print(f"Faster R-CNN / RetinaNet step time: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": str(date.today()),
                "args": vars(args),
                "step_s": rows,
                "faster_rcnn_over_retinanet": ratio,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
