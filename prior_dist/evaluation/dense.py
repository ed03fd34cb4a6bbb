"""Segmentation and detection on the image tower: decode both splits once, then one fine-tune
per (label fraction, seed)."""

from __future__ import annotations

from typing import Literal

from prior_dist.evaluation.detection import detection_task
from prior_dist.evaluation.inputs import DataOptions, open_split
from prior_dist.evaluation.segmentation import segmentation_task
from prior_dist.evaluation.tensors import materialize
from prior_dist.runs import LoadedModel


def dense_task(
    task: Literal["segmentation", "detection"],
    loaded: LoadedModel,
    data: str,
    train_split: str,
    split: str,
    fractions,
    seeds,
    steps: int = 300,
    finetune: bool = False,
    detector: str = "retinanet",
    options: DataOptions | None = None,
) -> dict:
    """Segmentation or detection: decode both splits once, then one fine-tune per
    (fraction, seed)."""
    size = loaded.model.cfg.image.image_size
    train_set, test_set = open_split(data, train_split, options), open_split(data, split, options)
    seg = task == "segmentation"
    classes = train_set.mask_classes if seg else train_set.box_classes
    if not classes:
        raise ValueError(f"{data}: has no {'masks' if seg else 'boxes'} for {task}")
    train = materialize(train_set, size, masks=seg, boxes=not seg)
    test = materialize(test_set, size, masks=seg, boxes=not seg)
    tower = loaded.model.image
    if seg:
        result = segmentation_task(
            tower, size, train, test, classes, fractions, seeds, steps, finetune
        )
    else:
        result = detection_task(
            tower, size, train, test, classes, fractions, seeds, steps, detector, finetune
        )
    result.update(
        train_split_sha256=train_set.split_digest(),
        test_split_sha256=test_set.split_digest(),
        skipped={"train": sum(train.skipped.values()), "test": sum(test.skipped.values())},
    )
    return result
