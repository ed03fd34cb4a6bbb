"""`python -m prior_dist.export --checkpoint RUN_DIR --out DIR`: reusable encoders.

The directory's contents are described in `prior_dist.runs.export`: the image encoder in
torchvision's (ResNet) or timm's (ViT) layout, the text encoder as a Hugging Face BERT directory,
the heads, and a model card.
"""

from __future__ import annotations

import argparse
import sys

from prior_dist.runs import export_model, load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prior_dist.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory (its newest complete checkpoint) or a checkpoint directory",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.checkpoint)
        out = export_model(loaded, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"export: wrote {out} (from {loaded.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
