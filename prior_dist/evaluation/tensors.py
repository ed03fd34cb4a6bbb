"""Downstream samples as model-ready tensors, and the label-fraction subsets every fine-tuning
task shares.

Images are squashed to the model's input size and normalised as in pretraining; masks follow
with nearest-neighbour resampling and boxes are scaled with the image. Unreadable samples are
skipped and counted, never silently dropped.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from prior_dist.data.images import ImageDecodeError
from prior_dist.data.progress import bar
from prior_dist.data.transforms import MIMIC_MEAN, MIMIC_STD
from prior_dist.evaluation.datasets import DownstreamSet


class _Resized(Dataset):
    def __init__(self, dataset: DownstreamSet, size: int, masks: bool, boxes: bool):
        self.dataset, self.size, self.masks, self.boxes = dataset, size, masks, boxes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            sample = self.dataset[i]
        except (OSError, ImageDecodeError, ValueError) as exc:
            return {"error": f"{self.dataset.records[i].key}: {exc}"}
        size = self.size
        width, height = sample.image.size
        image = sample.image.resize((size, size), Image.Resampling.BILINEAR)
        out = {
            "image": torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()),
            "labels": torch.from_numpy(sample.labels),
        }
        if self.masks:
            if sample.masks is None:
                return {"error": f"{sample.key}: no mask"}
            out["masks"] = torch.from_numpy(
                np.stack(
                    [
                        np.asarray(
                            Image.fromarray(m.astype(np.uint8)).resize(
                                (size, size), Image.Resampling.NEAREST
                            )
                        )
                        for m in sample.masks
                    ]
                ).astype(bool)
            )
        if self.boxes:
            boxes = sample.boxes if sample.boxes is not None else np.zeros((0, 4), np.float32)
            scale = np.array([size / width, size / height] * 2, dtype=np.float32)
            out["boxes"] = torch.from_numpy(boxes * scale)
            out["box_labels"] = torch.from_numpy(
                sample.box_labels if sample.box_labels is not None else np.zeros(0, np.int64)
            )
        return out


@dataclass
class TensorSet:
    """A whole split in memory: uint8 images (normalised on use), labels, masks, boxes."""

    images: torch.Tensor  # uint8 [N, S, S]
    labels: torch.Tensor  # float32 [N, C], NaN = unknown
    masks: torch.Tensor | None = None  # bool [N, M, S, S]
    boxes: list[torch.Tensor] | None = None  # per image float32 [K, 4]
    box_labels: list[torch.Tensor] | None = None
    skipped: Counter | None = None

    def __len__(self) -> int:
        return len(self.images)

    def normalised(self, index: torch.Tensor | slice) -> torch.Tensor:
        return normalise(self.images[index])


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """`[B, S, S]` uint8 -> `[B, 1, S, S]` float, with the pretraining mean and std."""
    return ((images_uint8.float() / 255.0 - MIMIC_MEAN) / MIMIC_STD).unsqueeze(1)


def resized_chunks(
    dataset: DownstreamSet,
    size: int,
    masks: bool = False,
    boxes: bool = False,
    batch_size: int = 32,
    workers: int = 2,
):
    """Per chunk of `batch_size` samples, decoded in `workers` processes: (the readable items,
    the messages of the unreadable ones)."""
    loader = DataLoader(
        _Resized(dataset, size, masks, boxes),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=list,
    )
    desc = f"decode {dataset.name} [{dataset.split}]"
    for chunk in bar(loader, desc=desc, unit="batch", leave=False):
        yield ([c for c in chunk if "error" not in c], [c["error"] for c in chunk if "error" in c])


def materialize(
    dataset: DownstreamSet, size: int, masks: bool = False, boxes: bool = False, workers: int = 2
) -> TensorSet:
    """Decode and resize every sample once (in `workers` processes)."""
    kept, errors = [], []
    for good, bad in resized_chunks(dataset, size, masks, boxes, workers=workers):
        kept += good
        errors += bad
    for message in errors[:3]:
        print(f"evaluate: skipped {message}")
    skipped = Counter(unreadable=len(errors)) if errors else Counter()
    if not kept:
        raise ValueError(
            f"{dataset.name} [{dataset.split}]: no readable sample ({len(errors)} skipped)"
        )
    out = TensorSet(
        torch.stack([k["image"] for k in kept]),
        torch.stack([k["labels"] for k in kept]),
        skipped=skipped,
    )
    if masks:
        out.masks = torch.stack([k["masks"] for k in kept])
    if boxes:
        out.boxes = [k["boxes"] for k in kept]
        out.box_labels = [k["box_labels"] for k in kept]
    return out


def label_subset(
    num_train: int,
    fraction: float,
    seed: int,
    labels: torch.Tensor | None = None,
    minimum: int = 2,
) -> torch.Tensor:
    """The training indices one (fraction, seed) run uses, at least `minimum` of them.

    With `labels [N, C]` (1 positive; 0, -1 or NaN not), the draw is stratified per label, the
    rarest first (iterative stratification for multi-label sets): each class with positives gets
    round(fraction x its positives) of them, at least one, while the budget lasts; the rest is a
    seeded draw. Without labels it is a seeded draw (so a 1% subset can miss a class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} must be in (0, 1]")
    count = min(num_train, max(minimum, round(fraction * num_train)))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_train, generator=g)
    if labels is None:
        return order[:count]
    positive = torch.nan_to_num(labels.float(), nan=0.0)[order] == 1  # rows in `order`
    chosen = torch.zeros(num_train, dtype=torch.bool)  # by position in `order`
    for c in sorted(range(positive.shape[1]), key=lambda c: int(positive[:, c].sum())):
        total = int(positive[:, c].sum())
        if total == 0:
            continue
        want = max(1, round(fraction * total)) - int((positive[:, c] & chosen).sum())
        free = (positive[:, c] & ~chosen).nonzero().flatten()
        take = free[: max(0, min(want, count - int(chosen.sum())))]
        chosen[take] = True
    rest = (~chosen).nonzero().flatten()[: count - int(chosen.sum())]
    chosen[rest] = True
    return order[chosen.nonzero().flatten()]


def spread(values: list[float]) -> float | None:
    """The sample standard deviation over seeds (None with fewer than two)."""
    return statistics.stdev(values) if len(values) >= 2 else None


def fraction_grid(num_train: int, fractions, seeds, run, keys) -> dict:
    """`run(indices, seed) -> metrics dict` for every (fraction, seed); per fraction the
    labels used, every seed's metrics, and the mean and sample standard deviation of each of
    `keys`."""
    out = {}
    for fraction in fractions:
        runs = []
        for seed in seeds:
            indices = label_subset(num_train, fraction, seed)
            runs.append(run(indices, seed))
        summary = {"labels_used": len(indices), "per_seed": runs}
        for key in keys:
            values = [r[key] for r in runs]
            summary[f"{key}_mean"] = statistics.mean(values)
            summary[f"{key}_std"] = spread(values)
        out[f"{fraction:g}"] = summary
    return out


def batches(indices: torch.Tensor, batch_size: int, steps: int, seed: int):
    """`steps` batches of `indices`, reshuffled each pass (small subsets repeat)."""
    g = torch.Generator().manual_seed(seed)
    order = indices[torch.randperm(len(indices), generator=g)]
    position = 0
    desc = f"fine-tune ({len(indices)} labelled, seed {seed})"
    for _ in bar(range(steps), desc=desc, unit="step", leave=False):
        if position + batch_size > len(order):
            order = indices[torch.randperm(len(indices), generator=g)]
            position = 0
        yield order[position : position + batch_size]
        position += batch_size
