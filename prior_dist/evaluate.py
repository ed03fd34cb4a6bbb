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
import sys
from pathlib import Path

import torch

from prior_dist.atomic import write_json
from prior_dist.data.labels import CHEXPERT_COMPETITION
from prior_dist.evaluation.datasets import write_split_file
from prior_dist.evaluation.dense import dense_task
from prior_dist.evaluation.inputs import (
    DataOptions,
    inference_precision,
    random_init_like,
    resolve_device,
)
from prior_dist.evaluation.linear_probe import linear_probe
from prior_dist.evaluation.retrieval import retrieval
from prior_dist.evaluation.zero_shot import PROMPT_SETS, PromptOptions, headline_accuracy, zero_shot
from prior_dist.runs import load_model
from prior_dist.runs.layout import MARKER

TASKS = {"zero-shot", "retrieval", "linear-probe", "segmentation", "detection"}


def run_task(task: str, loaded, data: str, args) -> dict:
    torch.manual_seed(0)
    options = DataOptions(args.split_file, args.uncertain)
    if task == "zero-shot":
        classes = args.classes.split(",") if args.classes else None
        return zero_shot(
            loaded,
            data,
            args.split,
            classes,
            prompts=_prompt_options(args),
            local_weight=None if args.local_weight == "auto" else float(args.local_weight),
            options=options,
            multi_label=args.multi_label,
            select_split=args.select_split,
        )
    if task == "retrieval":
        if ":" in data and not Path(data).exists():
            raise ValueError(f"retrieval needs reports; {data} has none (use pretraining shards)")
        classes = args.classes.split(",") if args.classes else CHEXPERT_COMPETITION
        return retrieval(loaded, data, args.split, classes, through_bank=args.bank == "on")
    fractions = tuple(float(f) for f in args.fractions.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if task == "linear-probe":
        classes = args.classes.split(",") if args.classes else None
        return linear_probe(
            loaded, data, args.train_split, args.split, classes, fractions, seeds, options
        )
    return dense_task(
        task,
        loaded,
        data,
        args.train_split,
        args.split,
        fractions,
        seeds,
        args.steps,
        args.finetune,
        args.detector,
        options,
    )


def _prompt_options(args) -> PromptOptions:
    """`--prompt-set`, `--prompt` (templates replacing the set's), `--form`; `--multi-label`
    implies the pos-neg form."""
    form = "pos_neg" if args.multi_label or args.form == "pos-neg" else "classes"
    named = PromptOptions.named(args.prompt_set, form)
    templates = tuple(args.prompt) if args.prompt else named.templates
    return PromptOptions(templates, named.phrases, form, through_bank=args.bank == "on")


def _pm(summary: dict, key: str) -> str:
    """`mean ± sample std over seeds`, or the mean alone for one seed."""
    std = summary.get(f"{key}_std")
    mean = f"{summary[f'{key}_mean']:.3f}"
    return mean if std is None else f"{mean} ± {std:.3f}"


def _table(result: dict, prefix: str = "") -> list[str]:
    """Every number of a result, one `name value` line each (per-seed lists and matrices are
    in the JSON file)."""
    lines = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += _table(value, name + ".")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        else:
            lines.append(
                f"    {name:<44} {value:.4f}"
                if isinstance(value, float)
                else f"    {name:<44} {value}"
            )
    return lines


def default_out(checkpoint: str, task: str) -> Path:
    """Where results go without --out: `eval/TASK.json` in the run directory (also for one of
    its checkpoint directories), the export directory, or beside a checkpoint file."""
    path = Path(checkpoint)
    if path.is_file():
        return path.parent / "eval" / f"{task}.json"
    if (path / MARKER).is_file():  # a checkpoint directory: its run's eval/
        path = path.parent.parent
    return path / "eval" / f"{task}.json"


def _headline(task: str, result: dict) -> str:
    if task == "zero-shot":
        c, g, loc = result["combined"], result["global_only"], result["local_only"]
        weight = f"local weight {result['local_weight']:g}"
        if "accuracy" not in c:
            return (
                f"macro AUC {c['macro_auc']:.3f} (global only {g['macro_auc']:.3f}, local only "
                f"{loc['macro_auc']:.3f}; {weight})"
            )
        accuracy, how = headline_accuracy(result)
        return (
            f"accuracy {accuracy:.3f} {how} (raw {c['accuracy']:.3f}, global only "
            f"{g['accuracy']:.3f}, local only {loc['accuracy']:.3f}; {weight}; majority class "
            f"{result['majority']:.3f}), macro F1 {c['macro_f1']:.3f}, macro AUC "
            f"{c['macro_auc']:.3f}"
        )
    if task == "retrieval":
        i2t, t2i = result["image_to_text"], result["text_to_image"]
        precision = f" P@5 {i2t['precision@5']:.3f}" if "precision@5" in i2t else " (no P@K)"
        return (
            f"i2t R@1/5/10 {i2t['recall@1']:.3f}/{i2t['recall@5']:.3f}/{i2t['recall@10']:.3f}"
            f"{precision}; t2i R@1/5/10 {t2i['recall@1']:.3f}/"
            f"{t2i['recall@5']:.3f}/{t2i['recall@10']:.3f}"
        )
    if task == "segmentation":
        return ", ".join(
            f"{k}: Dice {_pm(v, 'mean_dice')} IoU {v['mean_iou_mean']:.3f}"
            for k, v in result.items()
            if isinstance(v, dict) and "mean_dice_mean" in v
        )
    if task == "detection":
        return ", ".join(
            f"{k}: mAP@0.5 {_pm(v, 'map_50')} mAP {v['map_mean']:.3f}"
            for k, v in result.items()
            if isinstance(v, dict) and "map_mean" in v
        )
    return ", ".join(
        f"{k}: AUC {_pm(v, 'macro_auc')}"
        + (f" acc {v['accuracy_mean']:.3f}" if "accuracy_mean" in v else "")
        for k, v in result.items()
        if isinstance(v, dict) and v.get("macro_auc_mean") is not None
    )


def _write_splits(args) -> int:
    if not args.data or not args.out:
        print("evaluate: error: splits needs --data KIND:PATH and --out FILE", file=sys.stderr)
        return 2
    try:
        counts = write_split_file(
            args.data, args.out, **DataOptions(uncertain=args.uncertain).adapter_options(args.data)
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(f"splits of {args.data}: {counts} -> {args.out}")
    return 0


def _zero_shot_options(parser: argparse.ArgumentParser) -> None:
    zero = parser.add_argument_group("zero-shot")
    zero.add_argument(
        "--prompt-set",
        default="paper",
        choices=sorted(PROMPT_SETS),
        help="paper: '<class> is observed' (the reference); ensemble: several phrasings and "
        "report words per class, averaged in embedding space",
    )
    zero.add_argument(
        "--prompt", action="append", help="prompt template with {} (repeatable; replaces the set's)"
    )
    zero.add_argument(
        "--form",
        default="classes",
        choices=("classes", "pos-neg"),
        help="classes: softmax over the classes (the paper); pos-neg: per class, '<class>' "
        "against 'no <class>'",
    )
    zero.add_argument(
        "--local-weight",
        default="auto",
        help="combined = global + W x local; auto (default): the best W on --select-split (the "
        "paper's 0.5 when that split cannot score it); the paper uses 0.5",
    )
    zero.add_argument(
        "--bank",
        "--prompt-bank",
        dest="bank",
        default="off",
        choices=("on", "off"),
        help="zero-shot and retrieval: on: prompt and report sentences through the prototype "
        "bank, as stage 2-3 training sees sentences; off (default): their own embeddings (the "
        "bank can map several classes' prompts onto one prototype)",
    )
    zero.add_argument("--select-split", default="validate", help="where --local-weight auto looks")
    zero.add_argument(
        "--multi-label",
        action="store_true",
        help="per-class AUC over every image with a known label (pos-neg form)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prior_dist.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", choices=sorted(TASKS | {"splits"}))
    parser.add_argument(
        "--checkpoint",
        help="run, checkpoint or export directory, or the authors' released checkpoint file",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="with the authors' checkpoint: a local directory of its tokenizer",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present) | cpu | cuda | cuda:N; on CUDA under bf16/fp16 autocast",
    )
    parser.add_argument(
        "--data", default=None, help="shard directory (default: the run's) or KIND:PATH"
    )
    parser.add_argument("--split-file", default=None, help="JSON {split: [keys]} (KIND:PATH)")
    parser.add_argument(
        "--uncertain",
        default="ignore",
        choices=("ignore", "ones", "zeros"),
        help="CheXpert -1 labels",
    )
    parser.add_argument("--classes", default=None, help="comma-separated class subset")
    parser.add_argument("--split", default="test")
    parser.add_argument("--train-split", default="train", help="linear-probe training split")
    _zero_shot_options(parser)
    parser.add_argument("--fractions", default="0.01,0.1,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--steps",
        type=int,
        default=300,
        help="optimizer steps per segmentation/detection fine-tune",
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="segmentation/detection: train the encoder too (default frozen)",
    )
    parser.add_argument("--detector", default="retinanet", choices=("retinanet", "faster_rcnn"))
    parser.add_argument("--no-baseline", action="store_true", help="skip the random-init encoder")
    parser.add_argument(
        "--out", default=None, help="results JSON (default: RUN_DIR/eval/TASK.json)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.task == "splits":
        return _write_splits(args)
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    try:
        device = resolve_device(args.device)
        loaded = load_model(args.checkpoint, args.tokenizer)
        loaded.model.to(device)
        data = args.data or loaded.data_path
        if not data:
            raise ValueError("--data is needed: the checkpoint does not say where its data is")
        result = {
            "task": args.task,
            "checkpoint": loaded.source,
            "data": data,
            "split": args.split,
            "device": str(device),
        }
        with inference_precision(device):
            result["pretrained"] = run_task(args.task, loaded, data, args)
            if not args.no_baseline:
                result["random_init"] = run_task(args.task, random_init_like(loaded), data, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.task} on {data} [{args.split}]")
    for name in ("pretrained", "random_init"):
        if name in result:
            print(f"  {name:<12} {_headline(args.task, result[name])}")
            print("\n".join(_table(result[name])))
    out = Path(args.out) if args.out else default_out(args.checkpoint, args.task)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result, indent=1)
    except OSError as err:
        print(f"evaluate: error: could not write {out}: {err} (pass --out)", file=sys.stderr)
        return 2
    print(f"evaluate: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
