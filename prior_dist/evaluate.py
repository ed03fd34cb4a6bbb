"""`python -m prior_dist.evaluate TASK --checkpoint RUN_DIR|EXPORT_DIR [--data SPEC] --out FILE`.

Tasks: `zero-shot` (paper score and global-only: accuracy, macro F1, per-class AUC),
`retrieval` (image-to-text and text-to-image Recall@1/5/10, median rank, Precision@K by
label), `linear-probe` (frozen image encoder, logistic head on 1% / 10% / 100% of the training
labels, several seeds; macro AUC, and accuracy for single-label sets), `segmentation` (U-Net
decoder on the image tower; Dice and IoU) and `detection` (RetinaNet or Faster R-CNN on the
tower; mAP@0.5 and COCO mAP), the last two at the same label fractions and seeds. Every task
reports the same numbers for a randomly initialised encoder of the same configuration next to
the pretrained one. `--data` defaults to the shards the run was trained on; `KIND:PATH` reads a
public layout (chexpert, chexpert5x200, rsna, siim, covidx: see
`prior_dist/evaluation/datasets.py`). `splits` writes a dataset's split lists for
`--split-file`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from prior_dist.evaluation.metrics import (macro_auc, macro_f1, precision_at_k,
                                           retrieval_metrics)
from prior_dist.evaluation.zero_shot import class_prompts, zero_shot_parts

ZERO_SHOT_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
PROBE_CLASSES = ZERO_SHOT_CLASSES + ("Pneumothorax", "Lung Lesion", "Support Devices")


def _loader(loaded, data: str, split: str, labels, batch_size: int = 64):
    from prior_dist.data.loader import PriorLoader
    from prior_dist.data.transforms import TransformConfig

    cfg = loaded.model.cfg
    return PriorLoader(data, loaded.tokenizer, batch_size, split=split, rank=0, world_size=1,
                       shuffle=False, label_names=list(labels),
                       transform=TransformConfig(image_size=cfg.image.image_size,
                                                 rotation_degrees=0.0, shuffle_sentences=False,
                                                 max_tokens=min(256,
                                                                cfg.text.max_position_embeddings)))


def _adapter_options(data: str, args) -> dict:
    """The command-line options that apply to `data`'s adapter."""
    if args is not None and data.startswith("chexpert:"):
        return {"uncertain": args.uncertain}
    return {}


def _downstream(data: str, split: str, args=None):
    from prior_dist.evaluation.datasets import open_dataset

    return open_dataset(data, split, getattr(args, "split_file", None),
                        **_adapter_options(data, args))


def _image_batches(loaded, dataset, batch_size: int = 64):
    """(normalised images [B, 1, S, S], labels [B, C]) over a downstream split, streamed."""
    from prior_dist.evaluation.tensors import normalise, resized_chunks

    skipped = 0
    for good, errors in resized_chunks(dataset, loaded.model.cfg.image.image_size,
                                       batch_size=batch_size):
        skipped += len(errors)
        if good:
            yield (normalise(torch.stack([c["image"] for c in good])),
                   torch.stack([c["labels"] for c in good]))
    if skipped:
        print(f"evaluate: {dataset.name} [{dataset.split}]: skipped {skipped} unreadable images")


@torch.no_grad()
def zero_shot(loaded, data: str, split: str, classes=None,
              prompts=("{} is observed",), local_weight: float = 0.5, args=None) -> dict:
    model = loaded.model
    device = next(model.parameters()).device
    dataset = _downstream(data, split, args)
    classes = tuple(classes or (dataset.classes if dataset.exclusive else ZERO_SHOT_CLASSES))
    missing = [c for c in classes if c not in dataset.classes]
    if missing:
        raise ValueError(f"{data}: classes {missing} not in its labels {list(dataset.classes)}")
    columns = [dataset.classes.index(c) for c in classes]
    per_prompt = [class_prompts(model, loaded.tokenizer, classes, p, 256, device, True)
                  for p in prompts]
    combined, global_only, targets = [], [], []
    for images, labels in _image_batches(loaded, dataset):
        labels = labels[:, columns]
        single = (labels.nan_to_num(0).sum(1) == 1) & ~labels.isnan().any(1)
        if not bool(single.any()):
            continue
        images = images[single].to(device)
        global_part, local_part = zero_shot_parts(model, images, per_prompt)
        combined.append(global_part + local_weight * local_part)
        global_only.append(global_part)
        targets.append(labels[single].argmax(1))
    if not targets:
        raise ValueError(f"{data} [{split}]: no image with exactly one of {list(classes)}")
    target = torch.cat(targets)
    onehot = F.one_hot(target, len(classes))
    out = {"images": len(target), "classes": list(classes), "prompts": list(prompts),
           "chance": 1 / len(classes)}
    for name, scores in (("paper_score", torch.cat(combined)), ("global_only",
                                                                 torch.cat(global_only))):
        predicted = scores.argmax(1).cpu()
        auc, per_class = macro_auc(scores.cpu(), onehot)
        out[name] = {"accuracy": float((predicted == target).double().mean()),
                     "macro_f1": macro_f1(predicted, target, len(classes)), "macro_auc": auc,
                     "per_class_auc": dict(zip(classes, per_class)),
                     "per_class_accuracy": {c: float((predicted[target == i] == i).double()
                                                     .mean()) if bool((target == i).any())
                                            else None for i, c in enumerate(classes)},
                     # rows: true class, columns: predicted class
                     "confusion": torch.bincount(target * len(classes) + predicted,
                                                 minlength=len(classes) ** 2)
                     .view(len(classes), len(classes)).tolist()}
    return out


@torch.no_grad()
def _embeddings(loaded, data: str, split: str, labels):
    model = loaded.model
    device = next(model.parameters()).device
    images, reports, pooled, all_labels = [], [], [], []
    for batch in _loader(loaded, data, split, labels):
        img = model.encode_image(batch["image"].to(device))
        txt = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                batch["sentence_index"].to(device))
        sentences = model.prototype_bank(txt.sentences)
        images.append(F.normalize(img.global_embedding.float(), dim=-1).cpu())
        reports.append(F.normalize(model.report_embedding(sentences, txt.sentence_mask).float(),
                                   dim=-1).cpu())
        pooled.append(img.patch_tokens.float().mean(1).cpu())
        all_labels.append(batch["labels"])
    return torch.cat(images), torch.cat(reports), torch.cat(pooled), torch.cat(all_labels)


def retrieval(loaded, data: str, split: str, classes=ZERO_SHOT_CLASSES) -> dict:
    images, reports, _, labels = _embeddings(loaded, data, split, classes)
    similarity = images @ reports.t()
    return {"pairs": len(images),
            "image_to_text": {**retrieval_metrics(similarity),
                              **precision_at_k(similarity, labels, labels)},
            "text_to_image": {**retrieval_metrics(similarity.t()),
                              **precision_at_k(similarity.t(), labels, labels)}}


@torch.no_grad()
def _image_features(loaded, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's own output, average-pooled (what a ResNet's `avgpool` gives: the
    deepest feature map, before any PRIOR projection), and the labels."""
    model = loaded.model
    device = next(model.parameters()).device
    features, labels = [], []
    for images, y in _image_batches(loaded, dataset):
        maps = model.image.feature_pyramid(images.to(device))
        features.append(maps[max(maps)].float().mean((2, 3)).cpu())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, seed: int, exclusive: bool,
                  steps: int = 300) -> torch.nn.Linear:
    """Logistic regression by L-BFGS: softmax for single-label sets, else one sigmoid per class
    with unknown (NaN) labels left out of the loss."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=steps,
                                  line_search_fn="strong_wolfe")
    known = ~y.isnan()
    target = y.nan_to_num(0.0)

    def closure():
        optimizer.zero_grad()
        logits = head(x)
        if exclusive:
            fit = F.cross_entropy(logits, target.argmax(1))
        else:
            fit = (F.binary_cross_entropy_with_logits(logits, target, reduction="none")
                   * known).sum() / known.sum().clamp_min(1)
        loss = fit + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def linear_probe(loaded, data: str, train_split: str, split: str, classes=None,
                 fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2), args=None) -> dict:
    from prior_dist.evaluation.tensors import label_subset

    train_set, test_set = _downstream(data, train_split, args), _downstream(data, split, args)
    classes = tuple(classes or (PROBE_CLASSES if not train_set.exclusive and set(PROBE_CLASSES)
                                <= set(train_set.classes) else train_set.classes))
    columns = [train_set.classes.index(c) for c in classes]
    train_x, train_y = _image_features(loaded, train_set)
    test_x, test_y = _image_features(loaded, test_set)
    train_y, test_y = train_y[:, columns], test_y[:, columns]
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    exclusive = train_set.exclusive
    out = {"classes": list(classes), "train_images": len(train_x), "test_images": len(test_x),
           "exclusive": exclusive, "train_split_sha256": train_set.split_digest(),
           "test_split_sha256": test_set.split_digest()}
    for fraction in fractions:
        aucs, accuracies = [], []
        for seed in seeds:
            pick = label_subset(len(train_x), fraction, seed)
            head = _fit_logistic(train_x[pick], train_y[pick], seed, exclusive)
            with torch.no_grad():
                scores = head(test_x)
            aucs.append(macro_auc(scores, test_y)[0])
            if exclusive:
                accuracies.append(float((scores.argmax(1) == test_y.argmax(1)).double().mean()))
        valid = [a for a in aucs if a == a]
        out[f"{fraction:g}"] = {"labels_used": len(pick),
                                "macro_auc_mean": statistics.mean(valid) if valid else None,
                                "macro_auc_std": statistics.pstdev(valid) if valid else None,
                                "per_seed": aucs}
        if exclusive:
            out[f"{fraction:g}"].update(accuracy_mean=statistics.mean(accuracies),
                                        accuracy_std=statistics.pstdev(accuracies))
    return out


def dense_task(task: str, loaded, data: str, train_split: str, split: str, fractions, seeds,
               args) -> dict:
    """Segmentation or detection: decode both splits once, then one fine-tune per
    (fraction, seed)."""
    from prior_dist.evaluation.tensors import materialize

    size = loaded.model.cfg.image.image_size
    train_set, test_set = _downstream(data, train_split, args), _downstream(data, split, args)
    seg = task == "segmentation"
    classes = train_set.mask_classes if seg else train_set.box_classes
    if not classes:
        raise ValueError(f"{data}: has no {'masks' if seg else 'boxes'} for {task}")
    train = materialize(train_set, size, masks=seg, boxes=not seg)
    test = materialize(test_set, size, masks=seg, boxes=not seg)
    tower = loaded.model.image
    if seg:
        from prior_dist.evaluation.segmentation import segmentation_task

        result = segmentation_task(tower, size, train, test, classes, fractions, seeds,
                                   args.steps, args.finetune)
    else:
        from prior_dist.evaluation.detection import detection_task

        result = detection_task(tower, size, train, test, classes, fractions, seeds, args.steps,
                                args.detector, args.finetune)
    result.update(train_split_sha256=train_set.split_digest(),
                  test_split_sha256=test_set.split_digest(),
                  skipped={"train": sum(train.skipped.values()),
                           "test": sum(test.skipped.values())})
    return result


def random_init_like(loaded):
    """The same configuration with random weights (the baseline every task reports)."""
    from prior_dist.evaluation.load import LoadedModel
    from prior_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(loaded.model.cfg).eval()
    return LoadedModel(model, loaded.tokenizer, "random-init", {})


TASKS = {"zero-shot", "retrieval", "linear-probe", "segmentation", "detection"}


def run_task(task: str, loaded, data: str, args) -> dict:
    torch.manual_seed(0)
    if task == "zero-shot":
        classes = args.classes.split(",") if args.classes else None
        return zero_shot(loaded, data, args.split, classes,
                         prompts=tuple(args.prompt or ["{} is observed"]), args=args)
    if task == "retrieval":
        if ":" in data and not Path(data).exists():
            raise ValueError(f"retrieval needs reports; {data} has none (use pretraining shards)")
        return retrieval(loaded, data, args.split)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if task == "linear-probe":
        classes = args.classes.split(",") if args.classes else None
        return linear_probe(loaded, data, args.train_split, args.split, classes, fractions,
                            seeds, args=args)
    return dense_task(task, loaded, data, args.train_split, args.split, fractions, seeds, args)


def _headline(task: str, result: dict) -> str:
    if task == "zero-shot":
        p, g = result["paper_score"], result["global_only"]
        return (f"accuracy {p['accuracy']:.3f} (global only {g['accuracy']:.3f}), macro F1 "
                f"{p['macro_f1']:.3f}, macro AUC {p['macro_auc']:.3f}")
    if task == "retrieval":
        i2t, t2i = result["image_to_text"], result["text_to_image"]
        return (f"i2t R@1/5/10 {i2t['recall@1']:.3f}/{i2t['recall@5']:.3f}/{i2t['recall@10']:.3f}"
                f" P@5 {i2t['precision@5']:.3f}; t2i R@1/5/10 {t2i['recall@1']:.3f}/"
                f"{t2i['recall@5']:.3f}/{t2i['recall@10']:.3f}")
    if task == "segmentation":
        return ", ".join(f"{k}: Dice {v['mean_dice_mean']:.3f} ± {v['mean_dice_std']:.3f} IoU "
                         f"{v['mean_iou_mean']:.3f}" for k, v in result.items()
                         if isinstance(v, dict) and "mean_dice_mean" in v)
    if task == "detection":
        return ", ".join(f"{k}: mAP@0.5 {v['map_50_mean']:.3f} ± {v['map_50_std']:.3f} mAP "
                         f"{v['map_mean']:.3f}" for k, v in result.items()
                         if isinstance(v, dict) and "map_mean" in v)
    return ", ".join(f"{k}: AUC {v['macro_auc_mean']:.3f} ± {v['macro_auc_std']:.3f}"
                     + (f" acc {v['accuracy_mean']:.3f}" if "accuracy_mean" in v else "")
                     for k, v in result.items()
                     if isinstance(v, dict) and v.get("macro_auc_mean") is not None)


def _write_splits(args) -> int:
    from prior_dist.evaluation.datasets import write_split_file

    if not args.data or not args.out:
        print("evaluate: error: splits needs --data KIND:PATH and --out FILE", file=sys.stderr)
        return 2
    try:
        counts = write_split_file(args.data, args.out, **_adapter_options(args.data, args))
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(f"splits of {args.data}: {counts} -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prior_dist.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS | {"splits"}))
    parser.add_argument("--checkpoint", help="run, checkpoint or export directory")
    parser.add_argument("--data", default=None,
                        help="shard directory (default: the run's) or KIND:PATH")
    parser.add_argument("--split-file", default=None, help="JSON {split: [keys]} (KIND:PATH)")
    parser.add_argument("--uncertain", default="ignore", choices=("ignore", "ones", "zeros"),
                        help="CheXpert -1 labels")
    parser.add_argument("--classes", default=None, help="comma-separated class subset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train-split", default="train", help="linear-probe training split")
    parser.add_argument("--prompt", action="append", help="zero-shot prompt with {} (repeatable)")
    parser.add_argument("--fractions", default="0.01,0.1,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300,
                        help="optimizer steps per segmentation/detection fine-tune")
    parser.add_argument("--finetune", action="store_true",
                        help="segmentation/detection: train the encoder too (default frozen)")
    parser.add_argument("--detector", default="retinanet", choices=("retinanet", "faster_rcnn"))
    parser.add_argument("--no-baseline", action="store_true", help="skip the random-init encoder")
    parser.add_argument("--out", default=None, help="results.json")
    args = parser.parse_args(argv)
    from prior_dist.evaluation.load import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.task == "splits":
        return _write_splits(args)
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    try:
        loaded = load_model(args.checkpoint)
        data = args.data or loaded.info.get("data_path") or loaded.info.get("data", {}).get("path")
        if not data:
            raise ValueError("--data is needed: the checkpoint does not say where its data is")
        result = {"task": args.task, "checkpoint": loaded.source, "data": data,
                  "split": args.split, "pretrained": run_task(args.task, loaded, data, args)}
        if not args.no_baseline:
            result["random_init"] = run_task(args.task, random_init_like(loaded), data, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.task} on {data} [{args.split}]")
    for name in ("pretrained", "random_init"):
        if name in result:
            print(f"  {name:<12} {_headline(args.task, result[name])}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
