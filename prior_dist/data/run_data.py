"""What a run reads: its shard directories (checked), its tokenizer, its per-rank loader."""

from __future__ import annotations

import os
from pathlib import Path

from prior_dist.atomic import file_lock
from prior_dist.data.config import DataConfig
from prior_dist.data.loader import PriorLoader, parse_sources
from prior_dist.data.tokenize import build_wordpiece, load_tokenizer


def shard_directory(cfg: DataConfig) -> Path:
    """The first local source directory of `data.path`, whose manifest and tokenizer speak for
    the run; every local source must hold a manifest.json (phantom shards are generated before
    this, by `prior_dist.preparation.provision`, where the recipe asks for them)."""
    local = _local_sources(parse_sources(cfg.sources()))
    missing = [source for source in local if not (source / "manifest.json").is_file()]
    if missing:
        raise ValueError(
            "; ".join(f"data.path source {source}: no manifest.json" for source in missing)
            + " (prepare data with `python -m prior_dist.shardify`"
            + (
                ", or set data.phantom_studies to generate phantom shards there"
                if len(local) == 1
                else ""
            )
            + ")"
        )
    return local[0]


def first_local_source(cfg: DataConfig) -> Path:
    """The first local shard directory of `data.path` (its manifest and tokenizer speak for the
    run)."""
    return _local_sources(parse_sources(cfg.sources()))[0]


def _local_sources(sources: list) -> list[Path]:
    """The local shard directories among `sources` (at least one, or a clear error)."""
    local = [Path(s.location) for s in sources if not s.remote]
    if not local:
        raise ValueError(
            "data.path: at least one local shard directory is needed (for the "
            "manifest counts and the tokenizer)"
        )
    return local


def load_training_tokenizer(cfg: DataConfig, shards: Path, fallback: Path | None = None):
    """The run's tokenizer: the configured one, or the WordPiece vocabulary of `shards`: read
    from `shards/wordpiece` when it is there (nothing written), else built once under a lock
    every rank shares, into `shards/wordpiece`, or into `fallback` (the run's own directory)
    where nobody may write the shards."""
    if cfg.tokenizer != "auto":
        return load_tokenizer(cfg.tokenizer)
    target = shards / "wordpiece"
    if (target / "vocab.txt").is_file():
        return build_wordpiece(shards, target, vocab_size=cfg.vocab_size)
    if fallback is not None and not os.access(shards, os.W_OK):
        target = fallback
    with file_lock(target):
        return build_wordpiece(shards, target, vocab_size=cfg.vocab_size)


def training_loader(
    cfg: DataConfig,
    tokenizer,
    micro_batch_size: int,
    image_size: int,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
) -> PriorLoader:
    # Drop the ragged last batch: every rank must hold the same number of samples for the
    # gathered contrastive loss and for batch statistics to match the global batch.
    return PriorLoader(
        cfg.sources(),
        tokenizer,
        micro_batch_size,
        split="train",
        transform=cfg.transform(image_size, train=True),
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.worker_count(),
        mode=cfg.mode,
        last_batch="drop",
        pin_memory=pin_memory,
    )
