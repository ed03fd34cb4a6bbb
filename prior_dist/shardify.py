"""`python -m prior_dist.shardify`: prepare datasets once into WebDataset tar shards.

Sub-commands: mimic-cxr, openi, manifest, phantom (write shards); finalize (merge array-task parts);
reindex (rewrite the consolidated split indexes); verify (re-read everything against the manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from prior_dist.data.images import MAX_PIXELS
from prior_dist.data.shards import load_manifest
from prior_dist.preparation.build import build_shards, finalize, reindex, verify
from prior_dist.preparation.sources import (
    FRONTAL_VIEWS,
    enumerate_manifest,
    enumerate_mimic,
    enumerate_openi,
    enumerate_phantom,
)
from prior_dist.preparation.study import PrepareSettings


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _add_common(parser: argparse.ArgumentParser, min_sentences: int) -> None:
    parser.add_argument(
        "--out", required=True, help="output directory for shards and manifest.json"
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="stored size in pixels (default 256)"
    )
    parser.add_argument(
        "--resize",
        choices=("short", "square"),
        default="short",
        help="'short': short side to --image-size, aspect kept; 'square': squash",
    )
    parser.add_argument(
        "--format", choices=("jpg", "png"), default="jpg", help="stored image format"
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    _add_filters(parser, min_sentences)
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="validation fraction of subjects when no split is given (default 0.05)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.05,
        help="test fraction of subjects when no split is given (default 0.05)",
    )
    _add_parallel(parser)


def _add_filters(parser: argparse.ArgumentParser, min_sentences: int) -> None:
    """What a study must be to be kept: image sizes, report length and sentences, encoding."""
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"skip (as unreadable_image) source images with more pixels, read from their "
        f"header before decoding (default {MAX_PIXELS}, Pillow's decompression-bomb limit)",
    )
    parser.add_argument(
        "--min-image-size",
        type=int,
        default=32,
        help="leave out (as image_too_small) source images whose shorter side is smaller "
        "(default 32 px)",
    )
    parser.add_argument(
        "--max-report-chars",
        type=int,
        default=20_000,
        help="skip (as report_too_long) reports longer than this many characters (default "
        "20000; MIMIC-CXR's longest are a few thousand)",
    )
    parser.add_argument(
        "--min-sentences",
        type=int,
        default=min_sentences,
        help=f"skip reports with fewer sentences (default {min_sentences})",
    )
    parser.add_argument(
        "--encoding-errors",
        choices=("skip", "repair"),
        default="skip",
        help="non-UTF-8 reports: skip the study, or decode as cp1252 and keep it",
    )


def _add_parallel(parser: argparse.ArgumentParser) -> None:
    """Worker processes and the array-job task of this run."""
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--num-tasks",
        type=int,
        default=_env_int("SLURM_ARRAY_TASK_COUNT", 1),
        help="array tasks in all (default: $SLURM_ARRAY_TASK_COUNT or 1)",
    )
    parser.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this task's index (default: $SLURM_ARRAY_TASK_ID minus $SLURM_ARRAY_TASK_MIN, or 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_maintenance(sub) -> None:
    """The sub-commands that work on a written data set directory."""
    for name, text in (
        ("finalize", "merge the part manifests written by array tasks"),
        ("reindex", "(re)write each split's consolidated index from the shard indexes"),
        ("verify", "re-read every shard and check it against the manifest"),
    ):
        sub.add_parser(name, help=text).add_argument("dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prior_dist.shardify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    mimic = sub.add_parser("mimic-cxr", help="MIMIC-CXR-JPG images + MIMIC-CXR reports")
    mimic.add_argument("--images", required=True, help="MIMIC-CXR-JPG root (holding files/pXX/...)")
    mimic.add_argument(
        "--reports", required=True, help="MIMIC-CXR report root (holding files/pXX/...)"
    )
    mimic.add_argument("--metadata", required=True, help="mimic-cxr-2.0.0-metadata.csv[.gz]")
    mimic.add_argument(
        "--split", default=None, help="mimic-cxr-2.0.0-split.csv[.gz] (default: split by subject)"
    )
    mimic.add_argument("--labels", default=None, help="mimic-cxr-2.0.0-chexpert.csv[.gz]")
    mimic.add_argument(
        "--views",
        default=",".join(FRONTAL_VIEWS),
        help="comma-separated ViewPosition values to keep (default PA,AP)",
    )
    _add_common(mimic, min_sentences=4)

    openi = sub.add_parser(
        "openi", help="the Indiana University chest X-ray collection (OpenI): NLM XML + PNGs"
    )
    openi.add_argument(
        "--reports", required=True, help="the report XML directory (ecgen-radiology/) or its .tgz"
    )
    images = openi.add_mutually_exclusive_group(required=True)
    images.add_argument("--images", help="the PNG directory (<parentImage id>.png)")
    images.add_argument(
        "--render-phantom",
        action="store_true",
        help="no images: draw each report's MeSH findings with the phantom renderer "
        "(synthetic pairs, marked in the manifest and every sample)",
    )
    openi.add_argument(
        "--views",
        default=None,
        help="CSV[.gz] of image id (filename|imageid|image|id) -> view (projection|view|"
        "View Position): keep the frontal ones (default: each report's first figure)",
    )
    _add_common(openi, min_sentences=1)

    manifest = sub.add_parser("manifest", help="a CSV or JSONL listing images and reports")
    manifest.add_argument("--input", required=True, help="FILE.csv, FILE.csv.gz or FILE.jsonl")
    _add_common(manifest, min_sentences=1)

    phantom = sub.add_parser("phantom", help="the built-in synthetic chest X-ray dataset")
    phantom.add_argument("--num", type=int, required=True, help="number of studies")
    phantom.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    _add_common(phantom, min_sentences=1)

    _add_maintenance(sub)
    return parser


def _task_index(args: argparse.Namespace) -> int:
    if args.task_index is not None:
        return args.task_index
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
    return 0


def _enumerate(args: argparse.Namespace):
    """The studies, the enumeration skips and the source record of a writing sub-command."""
    fractions = (args.val_fraction, args.test_fraction)
    if args.command == "mimic-cxr":
        views = tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
        return enumerate_mimic(
            args.images, args.reports, args.metadata, args.split, args.labels, views, *fractions
        )
    if args.command == "openi":
        return enumerate_openi(
            args.reports, args.images, args.views, args.render_phantom, *fractions
        )
    if args.command == "manifest":
        return enumerate_manifest(args.input, *fractions)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    return enumerate_phantom(args.num, args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "finalize":
            print(json.dumps(finalize(args.dir)))
            return 0
        if args.command == "reindex":
            print(json.dumps(reindex(args.dir)))
            return 0
        if args.command == "verify":
            problems = verify(args.dir)
            for problem in problems:
                print(f"verify: {problem}", file=sys.stderr)
            print(f"verify: {args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        settings = PrepareSettings(
            image_size=args.image_size,
            resize_mode=args.resize,
            image_format=args.format,
            jpeg_quality=args.quality,
            min_sentences=args.min_sentences,
            encoding_errors=args.encoding_errors,
            max_pixels=args.max_pixels,
            min_image_size=args.min_image_size,
            max_report_chars=args.max_report_chars,
            phantom_seed=getattr(args, "seed", 0) if args.command == "phantom" else 0,
        )
        records, skipped, source = _enumerate(args)
        summary = build_shards(
            records,
            skipped,
            source,
            settings,
            args.out,
            args.shard_size,
            args.workers,
            args.num_tasks,
            _task_index(args),
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"shardify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nshardify: interrupted; finished shards are kept and the same command resumes",
            file=sys.stderr,
        )
        return 130
    if "manifest" in summary:
        _print_skips(load_manifest(args.out))
    print(json.dumps(summary))
    return 0


def _print_skips(manifest: dict) -> None:
    """Each skip reason with its count and first examples, on stderr (stdout keeps the JSON)."""
    for reason, entry in sorted(manifest["skipped"].items()):
        examples = "; ".join(entry.get("examples", []))
        print(f"shardify: skipped {entry['count']} ({reason}), e.g. {examples}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
