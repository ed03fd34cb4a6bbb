"""Evaluation metrics written out plainly (no scikit-learn dependency; scipy ranks)."""

from __future__ import annotations

import torch
from scipy.stats import rankdata


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class.
    Vectorised: `scipy.stats.rankdata` gives the average ranks (O(N log N))."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores.numpy(), method="average")
    rank_sum = float(ranks[labels.numpy()].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def macro_auc(scores_NC: torch.Tensor, labels_NC: torch.Tensor) -> tuple[float, list[float]]:
    """Mean of the per-class AUCs; unknown (NaN) labels are left out of their class."""
    labels_NC = labels_NC.float()
    per_class = []
    for c in range(scores_NC.shape[1]):
        known = ~labels_NC[:, c].isnan()
        per_class.append(roc_auc(scores_NC[known, c], labels_NC[known, c]))
    valid = [a for a in per_class if a == a]
    return (sum(valid) / len(valid) if valid else float("nan")), per_class


def macro_f1(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((predicted == c) & (target == c)).sum())
        fp = int(((predicted == c) & (target != c)).sum())
        fn = int(((predicted != c) & (target == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_classes


def retrieval_metrics(similarity_QN: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Query i's match is item i: Recall@K and the median rank (1 = first)."""
    target = similarity_QN.diagonal()
    ranks = (similarity_QN > target[:, None]).sum(1) + 1
    out = {f"recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    out["median_rank"] = float(ranks.double().median())
    return out


def precision_at_k(
    similarity_QN: torch.Tensor,
    query_labels: torch.Tensor,
    item_labels: torch.Tensor,
    ks=(1, 5, 10),
) -> dict:
    """Fraction of the top K items whose label vector equals the query's (same findings)."""
    out = {}
    for k in ks:
        top = similarity_QN.topk(min(k, similarity_QN.shape[1]), dim=1).indices
        same = (item_labels[top] == query_labels[:, None]).all(-1)
        out[f"precision@{k}"] = float(same.double().mean())
    return out
