"""`python -m prior_dist.export --checkpoint RUN_DIR --out DIR`: reusable encoders.

`--from-reference CKPT --tokenizer DIR` converts the authors' released PRIOR checkpoint instead
(their Lightning `.ckpt`, or its `state_dict` saved alone) into the same layout: our `paper`
model with `--compat reference`, loaded strictly; any missing, unexpected or mis-shaped key is
refused by name.

The directory's contents are described in `prior_dist.runs.export`: the image encoder in
torchvision's (ResNet) or timm's (ViT) layout, the text encoder as a Hugging Face BERT directory,
the heads, and a model card.
"""

from __future__ import annotations

import argparse
import sys

from prior_dist.runs import export_model, load_model
from prior_dist.runs.load import load_reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prior_dist.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        help="a run directory (its newest complete checkpoint) or a checkpoint directory",
    )
    source.add_argument(
        "--from-reference", metavar="CKPT", help="the authors' released PRIOR checkpoint file"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="with --from-reference: a local directory of the tokenizer it was trained with",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.from_reference:
            loaded = load_reference(args.from_reference, args.tokenizer)
        else:
            loaded = load_model(args.checkpoint)
        out = export_model(loaded, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"export: wrote {out} (from {loaded.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
