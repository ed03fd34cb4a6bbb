"""`python -m prior_dist.visualize KIND ...`: PNGs to look at rather than numbers to read.

- `curves --run RUN_DIR`: every loss term per optimizer step, stage boundaries marked.
- `attention --checkpoint X [--index N]`: an image and its report; each sentence's
  local-alignment attention over the image as a heatmap overlay.
- `confusion --checkpoint X`: the zero-shot confusion matrix on the split.
- `neighbours --checkpoint X [--index N] [--k 5]`: a query image and its nearest reports.
All write into `--out DIR` (default: the current directory) and print the file names.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

from prior_dist.data.labels import CHEXPERT_COMPETITION
from prior_dist.evaluation.inputs import inference_precision, report_loader, resolve_device
from prior_dist.evaluation.retrieval import embeddings
from prior_dist.evaluation.zero_shot import zero_shot
from prior_dist.runs import load_model
from prior_dist.runs.layout import METRICS
from prior_dist.task import LOSS_NAMES

# metrics.jsonl's `loss` is the weighted total; the terms follow under their own names.
LOSS_TERMS = ("loss", *LOSS_NAMES)


def _pyplot():
    # matplotlib is optional (the `viz` extra) and only pictures need it; Agg is chosen first.
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError(
            f"pictures need matplotlib: pip install 'prior_dist[viz]' ({err})"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curves(run_dir: Path, out: Path) -> Path:
    plt = _pyplot()
    rows = [
        json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()
    ]
    if not rows:
        raise ValueError(f"{run_dir}/{METRICS} is empty")
    terms = [t for t in LOSS_TERMS if any(t in r for r in rows)]
    boundaries = [r["step"] for a, r in zip(rows, rows[1:]) if r["stage"] != a["stage"]]
    cols = 3
    fig, axes = plt.subplots(
        -(-len(terms) // cols), cols, figsize=(12, 3 * -(-len(terms) // cols)), squeeze=False
    )
    for ax, term in zip(axes.flat, terms):
        steps = [r["step"] for r in rows if term in r]
        ax.plot(steps, [r[term] for r in rows if term in r], linewidth=1)
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(term)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(terms) :]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: losses per step (dashed: stage changes)")
    return _save(plt, fig, out / "curves.png")


def _sample(loaded, data: str, split: str, index: int):
    seen = 0
    for batch in report_loader(loaded, data, split, CHEXPERT_COMPETITION, batch_size=16):
        size = len(batch["key"])
        if index < seen + size:
            i = index - seen

            def pick(v, i=i, size=size):
                if torch.is_tensor(v) and v.dim() and v.shape[0] == size:
                    return v[i : i + 1]
                if isinstance(v, list) and len(v) == size:
                    return [v[i]]
                return v

            return {k: pick(v) for k, v in batch.items()}
        seen += len(batch["key"])
    raise ValueError(f"--index {index}: the {split} split has {seen} samples")


@torch.no_grad()
def attention_maps(loaded, data: str, split: str, index: int, out: Path) -> Path:
    plt = _pyplot()
    model = loaded.model
    sample = _sample(loaded, data, split, index)
    device = next(model.parameters()).device  # the model runs where --device put it
    inputs = {k: sample[k].to(device) for k in ("image", "input_ids", "attention_mask")}
    img = model.encode_image(inputs["image"])
    txt = model.encode_text(
        inputs["input_ids"], inputs["attention_mask"], sample["sentence_index"].to(device)
    )
    sentences = model.prototype_bank(txt.sentences)
    local = model.local_alignment(
        img.patch_tokens, sentences, txt.sentence_mask, return_attention=True
    )
    count = int(txt.sentence_mask.sum())
    h, w = img.grid
    maps = local.sentence_to_patch[0, :count].reshape(count, 1, h, w).float().cpu()
    size = sample["image"].shape[-1]
    maps = F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)
    image = sample["image"][0, 0].float()
    texts = sample["sentences"][0][:count]
    cols = min(4, count + 1)
    rows = -(-(count + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    axes.flat[0].imshow(image, cmap="gray")
    axes.flat[0].set_title(sample["key"][0], fontsize=8)
    for ax, heat, text in zip(list(axes.flat)[1:], maps[:, 0], texts):
        ax.imshow(image, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.45)
        ax.set_title("\n".join(textwrap.wrap(text, 34)[:3]), fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return _save(plt, fig, out / f"attention_{sample['key'][0]}.png")


@torch.no_grad()
def confusion_matrix(loaded, data: str, split: str, out: Path) -> Path:
    plt = _pyplot()
    result = zero_shot(loaded, data, split)  # the same numbers as `evaluate zero-shot`
    classes = result["classes"]
    matrix = torch.tensor(result["combined"]["confusion"])
    n = len(classes)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(matrix, cmap="Blues")
    for t in range(n):
        for p in range(n):
            ax.text(p, t, int(matrix[t, p]), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(n), classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = float(matrix.diagonal().sum() / matrix.sum().clamp_min(1))
    ax.set_title(f"zero-shot, {split} split: accuracy {accuracy:.3f}")
    return _save(plt, fig, out / "zero_shot_confusion.png")


@torch.no_grad()
def nearest_reports(loaded, data: str, split: str, index: int, k: int, out: Path) -> Path:
    plt = _pyplot()
    images, reports, _, _ = embeddings(loaded, data, split, CHEXPERT_COMPETITION)
    texts = [
        s
        for batch in report_loader(loaded, data, split, CHEXPERT_COMPETITION)
        for s in batch["sentences"]
    ]
    if not 0 <= index < len(images):
        raise ValueError(f"--index {index}: the {split} split has {len(images)} samples")
    top = (images[index] @ reports.t()).topk(min(k, len(reports)))
    sample = _sample(loaded, data, split, index)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 2]})
    left.imshow(sample["image"][0, 0].float(), cmap="gray")
    left.set_title(f"query {sample['key'][0]}", fontsize=9)
    left.axis("off")
    lines = []
    for rank, (score, j) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        mark = " (its own report)" if j == index else ""
        report = " ".join(texts[j])
        lines.append(f"{rank}. cos {score:.3f}{mark}\n" + "\n".join(textwrap.wrap(report, 90)[:3]))
    right.text(0, 1, "\n\n".join(lines), va="top", fontsize=8, family="monospace")
    right.axis("off")
    return _save(plt, fig, out / f"neighbours_{sample['key'][0]}.png")


def _figure(args, loaded, data: str, out: Path) -> Path:
    if args.kind == "attention":
        return attention_maps(loaded, data, args.split, args.index, out)
    if args.kind == "confusion":
        return confusion_matrix(loaded, data, args.split, out)
    return nearest_reports(loaded, data, args.split, args.index, args.k, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prior_dist.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=["curves", "attention", "confusion", "neighbours"])
    parser.add_argument("--run", help="run directory (curves)")
    parser.add_argument("--checkpoint", help="run, checkpoint or export directory")
    parser.add_argument("--data", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", default=".")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present) | cpu | cuda | cuda:N; on CUDA under bf16/fp16 autocast",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.kind == "curves":
            if not args.run:
                raise ValueError("curves needs --run RUN_DIR")
            path = training_curves(Path(args.run), out)
        else:
            if not args.checkpoint:
                raise ValueError(f"{args.kind} needs --checkpoint")
            device = resolve_device(args.device)
            loaded = load_model(args.checkpoint)
            loaded.model.to(device)
            data = args.data or loaded.data_path
            with inference_precision(device):
                path = _figure(args, loaded, data, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"visualize: error: {err}", file=sys.stderr)
        return 2
    print(f"visualize: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
