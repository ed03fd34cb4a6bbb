"""`python -m prior_dist.stream DIR`: stream one epoch of prepared shards through the loader.

A smoke test and throughput check for a data set: it reports batches, samples, corrupt samples
skipped, samples per second, and whether every sample of the split was served exactly once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from prior_dist.data.index import parse_sources
from prior_dist.data.loader import PriorLoader
from prior_dist.data.progress import bar
from prior_dist.data.shards import load_manifest
from prior_dist.data.tokenize import resolve_tokenizer
from prior_dist.data.transforms import TransformConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prior_dist.stream", description=__doc__)
    parser.add_argument("data", nargs="+", help="shard directories (DIR or DIR:WEIGHT)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", choices=("indexed", "stream", "resampled"), default=None)
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer directory or hub id (default: WordPiece built from the shards)",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        first = parse_sources(args.data)[0]
        load_manifest(first.manifest_dir or first.location)  # fail first on a missing data set
        tokenizer = resolve_tokenizer(args.tokenizer, first.manifest_dir or first.location)
        loader = PriorLoader(
            args.data if len(args.data) > 1 else args.data[0],
            tokenizer,
            args.batch_size,
            split=args.split,
            seed=args.seed,
            num_workers=args.workers,
            mode=args.mode,
            transform=TransformConfig(image_size=args.image_size),
            rank=0,
            world_size=1,
        )
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"stream: error: {exc}", file=sys.stderr)
        return 2
    report = _one_pass(loader, args.max_steps)
    print(json.dumps(report))
    return 0 if report["exactly_once"] in (True, None) else 1


def _one_pass(loader: PriorLoader, max_steps: int | None) -> dict:
    """Read (up to `max_steps` batches of) one epoch; throughput and the exactly-once check."""
    start = time.perf_counter()
    keys, batches, tokens = [], 0, 0
    total = min(len(loader), max_steps) if max_steps else len(loader)
    with bar(total=total, desc="stream", unit="batch") as progress:
        for batch in loader:
            keys.extend(batch["key"])
            tokens += int(batch["attention_mask"].sum())
            batches += 1
            progress.update()
            if max_steps and batches >= max_steps:
                break
    elapsed = time.perf_counter() - start
    full_epoch = not max_steps or batches == len(loader)
    return {
        "batches": batches,
        "samples": len(keys),
        "skipped_corrupt": loader.skipped["corrupt_sample"],
        "io_retries": loader.io_retries,
        "samples_per_second": round(len(keys) / elapsed, 1),
        "mean_tokens": round(tokens / max(len(keys), 1), 1),
        "exactly_once": (
            len(set(keys)) == len(keys)
            and len(keys) + loader.skipped["corrupt_sample"] == loader.samples_per_epoch
        )
        if full_epoch
        and loader.mode != "resampled"
        and all(s.weight == 1.0 for s in loader.sources)
        else None,
    }


if __name__ == "__main__":
    sys.exit(main())
