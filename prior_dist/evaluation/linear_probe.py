"""Linear probe: a logistic head on the frozen image encoder's pooled features, at label
fractions x seeds; macro AUC (and accuracy for single-label sets)."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from prior_dist.data.labels import PROBE_CLASSES
from prior_dist.evaluation.inputs import DataOptions, image_batches, open_split
from prior_dist.evaluation.metrics import macro_auc
from prior_dist.evaluation.tensors import label_subset, spread
from prior_dist.runs import LoadedModel


@torch.no_grad()
def image_features(loaded: LoadedModel, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's own output, average-pooled (what a ResNet's `avgpool` gives: the
    deepest feature map, before any PRIOR projection), and the labels."""
    model = loaded.model
    device = next(model.parameters()).device
    features, labels = [], []
    for images, y in image_batches(loaded, dataset):
        maps = model.image.feature_pyramid(images.to(device))
        features.append(maps[max(maps)].float().mean((2, 3)).cpu())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, seed: int, exclusive: bool, steps: int = 300
) -> torch.nn.Linear:
    """Logistic regression by L-BFGS: softmax for single-label sets, else one sigmoid per class
    with unknown (NaN) labels left out of the loss."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe"
    )
    known = ~y.isnan()
    target = y.nan_to_num(0.0)

    def closure():
        optimizer.zero_grad()
        logits = head(x)
        if exclusive:
            fit = F.cross_entropy(logits, target.argmax(1))
        else:
            fit = (
                F.binary_cross_entropy_with_logits(logits, target, reduction="none") * known
            ).sum() / known.sum().clamp_min(1)
        loss = fit + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def linear_probe(
    loaded: LoadedModel,
    data: str,
    train_split: str,
    split: str,
    classes=None,
    fractions=(0.01, 0.1, 1.0),
    seeds=(0, 1, 2),
    options: DataOptions | None = None,
) -> dict:
    train_set, test_set = open_split(data, train_split, options), open_split(data, split, options)
    classes = tuple(
        classes
        or (
            PROBE_CLASSES
            if not train_set.exclusive and set(PROBE_CLASSES) <= set(train_set.classes)
            else train_set.classes
        )
    )
    columns = [train_set.classes.index(c) for c in classes]
    train_x, train_y = image_features(loaded, train_set)
    test_x, test_y = image_features(loaded, test_set)
    train_y, test_y = train_y[:, columns], test_y[:, columns]
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    exclusive = train_set.exclusive
    out = {
        "classes": list(classes),
        "train_images": len(train_x),
        "test_images": len(test_x),
        "exclusive": exclusive,
        "train_split_sha256": train_set.split_digest(),
        "test_split_sha256": test_set.split_digest(),
    }
    for fraction in fractions:
        aucs, accuracies = [], []
        for seed in seeds:
            pick = label_subset(len(train_x), fraction, seed, train_y)
            head = fit_logistic(train_x[pick], train_y[pick], seed, exclusive)
            with torch.no_grad():
                scores = head(test_x)
            aucs.append(macro_auc(scores, test_y)[0])
            if exclusive:
                accuracies.append(float((scores.argmax(1) == test_y.argmax(1)).double().mean()))
        valid = [a for a in aucs if a == a]
        out[f"{fraction:g}"] = {
            "labels_used": len(pick),
            "macro_auc_mean": statistics.mean(valid) if valid else None,
            "macro_auc_std": spread(valid),
            "per_seed": aucs,
        }
        if exclusive:
            out[f"{fraction:g}"].update(
                accuracy_mean=statistics.mean(accuracies),
                accuracy_std=spread(accuracies),
            )
    return out
