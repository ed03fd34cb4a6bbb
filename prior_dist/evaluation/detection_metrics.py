"""Mean average precision for boxes, the COCO way (no pycocotools needed; tests compare to it).

Per class and IoU threshold: detections of all images sorted by score (at most `max_dets` per
image and class), each matched to the unmatched ground-truth box of highest IoU at or above the
threshold, precision made monotone, then read at 101 evenly spaced recall points. A class
without ground truth is left out of the mean. `map_50` is the mean at IoU 0.5; `map` averages
0.50:0.05:0.95.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _average_precision(scores: np.ndarray, matched: np.ndarray, num_truth: int) -> float:
    if num_truth == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    hits = matched[order].astype(np.float64)
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = tp / num_truth
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    where = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in where]))


def _match(iou: np.ndarray, threshold: float) -> np.ndarray:
    """For one image and class, predictions (rows, best score first) against truth boxes
    (columns): which predictions hit a truth box."""
    hit = np.zeros(iou.shape[0], dtype=bool)
    taken = np.zeros(iou.shape[1], dtype=bool)
    for i in range(iou.shape[0] if iou.shape[1] else 0):
        candidates = np.where(~taken & (iou[i] >= threshold))[0]
        if len(candidates):
            taken[candidates[np.argmax(iou[i, candidates])]] = True
            hit[i] = True
    return hit


def mean_average_precision(
    predictions: list[dict], targets: list[dict], num_classes: int, max_dets: int = 100
) -> dict:
    """`predictions[i]`: boxes [K, 4] (x0 y0 x1 y1), scores [K], labels [K] (0-based);
    `targets[i]`: boxes, labels. Returns map, map_50, map_75 and per-class AP at 0.5."""
    ap = np.full((len(THRESHOLDS), num_classes), np.nan)
    for c in range(num_classes):
        truth_count = sum(int((t["labels"] == c).sum()) for t in targets)
        # Per image, once for every threshold: the top `max_dets` of this class in score order
        # (as pycocotools keeps them) and their IoU with this class's truth boxes.
        scores, ious = [], []
        for p, t in zip(predictions, targets):
            pm = torch.nonzero(p["labels"] == c).flatten()
            pm = pm[torch.argsort(p["scores"][pm], descending=True, stable=True)][:max_dets]
            scores.append(p["scores"][pm].double().numpy())
            ious.append(
                box_iou(p["boxes"][pm].float(), t["boxes"][t["labels"] == c].float()).numpy()
            )
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        for ti, threshold in enumerate(THRESHOLDS):
            matched = [_match(iou, threshold) for iou in ious]
            ap[ti, c] = _average_precision(
                all_scores, np.concatenate(matched) if matched else np.zeros(0, bool), truth_count
            )

    def mean(values) -> float:
        values = values[~np.isnan(values)]
        return float(values.mean()) if len(values) else float("nan")

    return {
        "map": mean(ap.reshape(-1)),
        "map_50": mean(ap[0]),
        "map_75": mean(ap[THRESHOLDS.index(0.75)]),
        "ap_50_per_class": [None if np.isnan(v) else float(v) for v in ap[0]],
    }
