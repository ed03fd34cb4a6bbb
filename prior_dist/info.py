"""`python -m prior_dist.info --model paper [--compat reference]`: parameters and FLOPs.

Parameters are listed per component (trainable and frozen apart); forward FLOPs per sample are
counted with `torch.utils.flop_counter` (matmuls, convolutions, attention; 2 FLOPs per MAC) on a
stage-3 forward, the stage that runs every head.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from prior_dist.data.index import parse_sources
from prior_dist.data.shards import load_manifest
from prior_dist.models.config import model_config
from prior_dist.models.prior import PriorModel, build_model
from prior_dist.task import PriorTask, stage_plan
from prior_dist.training.cli import shipped_config
from prior_dist.training.ds_config import adamw_impl, check_against_recipe, read_deepspeed_config
from prior_dist.training.recipe import load_recipe
from prior_dist.training.schedule import plan_stages

# Components in the order of the spec's parameter budget; the first matching prefix wins.
COMPONENTS = (
    (
        "image backbone",
        (
            "image.backbone.",
            "image.patch_embed",
            "image.cls_token",
            "image.pos_embed",
            "image.blocks.",
            "image.norm.",
        ),
    ),
    ("image attention pool", ("image.attention_pool.",)),
    ("text BERT", ("text.bert.",)),
    ("sentence decoder", ("sentence_decoder.",)),
    ("image decoder", ("image_decoder.",)),
    (
        "projections",
        ("image.local_proj.", "image.global_proj.", "text.token_proj.", "text.global_proj."),
    ),
    ("report attention pool", ("report_pool.",)),
    ("local alignment + predictor", ("local_alignment.", "predictor.")),
    ("prototype bank", ("prototype_bank.",)),
    ("logit scales", ("logit_scales.",)),
)


def parameter_table(model: PriorModel) -> list[tuple[str, int, int]]:
    """(component, trainable, frozen) counts; every parameter lands in exactly one component."""
    rows = {name: [0, 0] for name, _ in COMPONENTS}
    for name, param in model.named_parameters():
        component = next((c for c, prefixes in COMPONENTS if name.startswith(prefixes)), None)
        if component is None:
            raise AssertionError(f"parameter {name} belongs to no component")
        rows[component][0 if param.requires_grad else 1] += param.numel()
    return [(name, t, f) for name, (t, f) in rows.items()]


def example_batch(model: PriorModel, batch: int, tokens: int, sentences: int) -> dict:
    cfg = model.cfg
    size = cfg.image.image_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.text.vocab_size, (batch, tokens), generator=generator)
    per_sentence = max(1, (tokens - 2) // sentences)
    index = torch.full((batch, tokens), -1, dtype=torch.long)
    index[:, 1 : tokens - 1] = (torch.arange(tokens - 2) // per_sentence).clamp_max(sentences - 1)
    return {
        "image": torch.randn(batch, 1, size, size, generator=generator),
        "input_ids": ids,
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
        "sentence_index": index,
    }


def forward_flops(
    model: PriorModel, batch: int = 2, tokens: int = 128, sentences: int = 8
) -> dict[str, float]:
    """Forward FLOPs per sample: image tower, text tower, heads (stage 3), total."""
    data = example_batch(model, batch, tokens, sentences)
    model.eval()

    def count(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / batch

    image = count(lambda: model.encode_image(data["image"]))
    text = count(
        lambda: model.encode_text(data["input_ids"], data["attention_mask"], data["sentence_index"])
    )
    total = count(lambda: PriorTask(model)(data, stage_plan(3)))
    return {"image tower": image, "text tower": text, "heads": total - image - text, "total": total}


def training_lines(recipe, config: str, ranks: int) -> list[str]:
    """What `--recipe R --config C` trains with on `ranks` ranks: batch, precision, ZeRO, the
    AdamW, and (when the recipe's shards are here) steps per epoch and each stage's steps."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ds = read_deepspeed_config(shipped_config(config))
    check_against_recipe(ds, recipe, device)
    adamw = {
        "torch": "torch AdamW",
        "torch_fused": "torch AdamW, fused",
        "deepspeed_fused": "DeepSpeed FusedAdam",
        "deepspeed_cpu": "DeepSpeed CPU Adam",
    }[adamw_impl(ds, recipe)]
    global_batch = ds.micro_batch_size * ds.gradient_accumulation_steps * ranks
    lines = [
        f"DeepSpeed {ds.path}: micro-batch {ds.micro_batch_size} x accumulation "
        f"{ds.gradient_accumulation_steps} x {ranks} rank(s) = global batch {global_batch}; "
        f"{ds.precision}; ZeRO {ds.zero_stage}"
        + f"; {adamw}"
        + ("" if ds.offload_optimizer else f" on {device}")
    ]
    sources = parse_sources(recipe.data.sources())
    try:
        counts = [load_manifest(s.location)["splits"]["train"]["num_samples"] for s in sources]
    except (FileNotFoundError, KeyError, ValueError) as err:
        return lines + [f"steps per epoch: unknown here ({err})"]
    if any(s.remote or s.weight != 1.0 for s in sources):
        return lines + [f"train samples {counts}; weighted or remote sources: see the run's start"]
    per_epoch = sum(counts) // global_batch
    spans = plan_stages(recipe.train.stages, per_epoch)
    return lines + [
        f"train split: {sum(counts)} samples -> {per_epoch} steps per epoch (last partial "
        f"batch dropped); stages end at steps {[s.end for s in spans]}"
    ]


def _described(args) -> tuple:
    """The model config to describe, its label, and the recipe (None for a named model): a
    recipe's model (its WordPiece vocabulary at `data.vocab_size`, which a small corpus may not
    fill) or a named model's."""
    if args.recipe is None:
        if args.overrides:
            raise ValueError("--set needs --recipe")
        label = f"model {args.model}, compat {args.compat}"
        return model_config(args.model, args.compat), label, None
    recipe, _ = load_recipe(args.recipe, args.overrides)
    # Shapes only: pretrained weights (a hub id the machine may not reach) are not loaded.
    cfg = recipe.model.replace(
        image=dataclasses.replace(recipe.model.image, pretrained=None),
        text=dataclasses.replace(recipe.model.text, pretrained=None),
    )
    if recipe.data.tokenizer == "auto":
        cfg = cfg.for_vocabulary(recipe.data.vocab_size)
    return cfg, f"recipe {recipe.name} (vocabulary {cfg.text.vocab_size})", recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prior_dist.info",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="paper", help="paper | demo | tiny")
    parser.add_argument(
        "--compat",
        default="default",
        choices=["default", "reference"],
        help="reference: every reference quirk on, unused reference parameters "
        "built (frozen) so counts compare with the original",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="describe the model this recipe trains (demo | paper | tiny | PATH.yaml) instead "
        "of a named model; with --set overrides",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE"
    )
    parser.add_argument("--tokens", type=int, default=128, help="report length for FLOPs")
    parser.add_argument("--sentences", type=int, default=8, help="sentences per report for FLOPs")
    parser.add_argument("--no-flops", action="store_true", help="parameters only")
    parser.add_argument(
        "--config",
        default=None,
        help="with --recipe: a DeepSpeed config (path or shipped name, e.g. zero2): the batch, "
        "precision, ZeRO stage, AdamW and steps this recipe would train with",
    )
    parser.add_argument("--ranks", type=int, default=1, help="with --config: number of ranks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg, label, recipe = _described(args)
        if args.config is not None:
            if recipe is None:
                raise ValueError("--config needs --recipe")
            training = training_lines(recipe, args.config, args.ranks)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = build_model(cfg)
    table = parameter_table(model)
    print(
        f"{label}: image {cfg.image.arch} "
        f"{cfg.image.image_size}px grid {cfg.image.grid}, embed {cfg.heads.embed_dim}"
    )
    print(f"{'component':<30}{'trainable':>14}{'frozen':>12}")
    for name, trainable, frozen in table:
        print(f"{name:<30}{trainable / 1e6:>13.2f}M{frozen / 1e6:>11.2f}M")
    trainable = sum(t for _, t, _ in table)
    frozen = sum(f for _, _, f in table)
    print(
        f"{'total':<30}{trainable / 1e6:>13.2f}M{frozen / 1e6:>11.2f}M"
        f"   (all: {(trainable + frozen) / 1e6:.2f}M)"
    )
    if args.config is not None:
        print("\n".join(training))
    if not args.no_flops:
        flops = forward_flops(model, tokens=args.tokens, sentences=args.sentences)
        print(
            f"forward GFLOPs per sample ({args.tokens} tokens, {args.sentences} sentences, "
            f"stage 3):"
        )
        for name, value in flops.items():
            print(f"  {name:<28}{value / 1e9:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
