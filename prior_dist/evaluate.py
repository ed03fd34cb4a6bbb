"""`python -m prior_dist.evaluate TASK --checkpoint RUN_DIR|EXPORT_DIR [--data DIR] --out FILE`.

Tasks so far: `zero-shot` (paper score and global-only: accuracy, macro F1, per-class AUC),
`retrieval` (image-to-text and text-to-image Recall@1/5/10, median rank, Precision@K by
label), `linear-probe` (frozen image encoder, logistic head on 1% / 10% / 100% of the training
labels, several seeds, macro AUC mean and standard deviation). Every task reports the same
numbers for a randomly initialised encoder of the same configuration next to the pretrained one.
`--data` defaults to the shards the run was trained on.
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
from prior_dist.evaluation.zero_shot import class_prompts, zero_shot_scores

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


@torch.no_grad()
def zero_shot(loaded, data: str, split: str, classes=ZERO_SHOT_CLASSES,
              prompts=("{} is observed",), local_weight: float = 0.5) -> dict:
    model = loaded.model
    device = next(model.parameters()).device
    per_prompt = [class_prompts(model, loaded.tokenizer, classes, p, 256, device, True)
                  for p in prompts]
    combined, global_only, targets = [], [], []
    for batch in _loader(loaded, data, split, classes):
        single = batch["labels"].sum(1) == 1
        if not bool(single.any()):
            continue
        images = batch["image"][single].to(device)
        combined.append(sum(zero_shot_scores(model, images, p, local_weight) for p in per_prompt))
        global_only.append(sum(zero_shot_scores(model, images, p, 0.0) for p in per_prompt))
        targets.append(batch["labels"][single].argmax(1))
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
                     "per_class_auc": dict(zip(classes, per_class))}
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


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=steps,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x), y) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def linear_probe(loaded, data: str, train_split: str, split: str, classes=PROBE_CLASSES,
                 fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2)) -> dict:
    _, _, train_x, train_y = _embeddings(loaded, data, train_split, classes)
    _, _, test_x, test_y = _embeddings(loaded, data, split, classes)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    out = {"classes": list(classes), "train_images": len(train_x), "test_images": len(test_x)}
    for fraction in fractions:
        aucs = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            count = max(2, round(fraction * len(train_x)))
            pick = torch.randperm(len(train_x), generator=g)[:count]
            head = _fit_logistic(train_x[pick], train_y[pick].float(), seed)
            with torch.no_grad():
                aucs.append(macro_auc(head(test_x), test_y)[0])
        valid = [a for a in aucs if a == a]
        out[f"{fraction:g}"] = {"labels_used": count, "macro_auc_mean": statistics.mean(valid),
                                "macro_auc_std": statistics.pstdev(valid), "per_seed": aucs}
    return out


def random_init_like(loaded):
    """The same configuration with random weights (the baseline every task reports)."""
    from prior_dist.evaluation.load import LoadedModel
    from prior_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(loaded.model.cfg).eval()
    return LoadedModel(model, loaded.tokenizer, "random-init", {})


TASKS = {"zero-shot", "retrieval", "linear-probe"}


def run_task(task: str, loaded, data: str, args) -> dict:
    if task == "zero-shot":
        return zero_shot(loaded, data, args.split, prompts=tuple(args.prompt or
                                                                 ["{} is observed"]))
    if task == "retrieval":
        return retrieval(loaded, data, args.split)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    return linear_probe(loaded, data, args.train_split, args.split, fractions=fractions,
                        seeds=seeds)


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
    return ", ".join(f"{k}: AUC {v['macro_auc_mean']:.3f} ± {v['macro_auc_std']:.3f}"
                     for k, v in result.items() if isinstance(v, dict))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prior_dist.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or export directory")
    parser.add_argument("--data", default=None, help="shard directory (default: the run's)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train-split", default="train", help="linear-probe training split")
    parser.add_argument("--prompt", action="append", help="zero-shot prompt with {} (repeatable)")
    parser.add_argument("--fractions", default="0.01,0.1,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-baseline", action="store_true", help="skip the random-init encoder")
    parser.add_argument("--out", default=None, help="results.json")
    args = parser.parse_args(argv)
    from prior_dist.evaluation.load import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
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
