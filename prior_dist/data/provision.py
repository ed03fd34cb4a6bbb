"""The data a run needs: phantom shards on first use, the tokenizer, and the per-rank loaders."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from prior_dist.data.build import build_shards
from prior_dist.data.config import DataConfig
from prior_dist.data.loader import PriorLoader, parse_sources
from prior_dist.data.phantom import GENERATOR_VERSION
from prior_dist.data.prepare import PrepareSettings
from prior_dist.data.sources import enumerate_phantom
from prior_dist.data.tokenize import build_wordpiece, load_tokenizer


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock shared by every rank on the node (and nodes sharing the file system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_phantom_shards(cfg: DataConfig, log=print) -> Path:
    """The first local source directory (phantom shards generated there first when asked);
    every local source must hold a manifest.json. The phantom's seed is `data.phantom_seed`,
    not the training seed: a seed sweep trains on the same data."""
    seed = cfg.phantom_seed
    sources = parse_sources(cfg.sources())
    local = _local_sources(sources)
    for extra in local[1:]:
        if not (extra / "manifest.json").is_file():
            raise ValueError(f"data.path source {extra}: no manifest.json")
    path = local[0]
    if (path / "manifest.json").is_file():
        _check_phantom_manifest(path, cfg, seed)
        return path
    if cfg.phantom_studies is None or len(sources) > 1:
        raise ValueError(
            f"data.path {path}: no manifest.json (prepare data with "
            "`python -m prior_dist.shardify`, or set data.phantom_studies to "
            "generate phantom shards there)"
        )
    with file_lock(path.parent / f".{path.name}.lock"):
        if not (path / "manifest.json").is_file():
            log(f"data: generating {cfg.phantom_studies} phantom studies into {path}")
            records, skipped, source = enumerate_phantom(cfg.phantom_studies, seed)
            build_shards(
                records,
                skipped,
                source,
                PrepareSettings(image_size=cfg.phantom_image_size, phantom_seed=seed),
                path,
                shard_size=cfg.phantom_shard_size,
                progress=False,
            )
    return path


def _check_phantom_manifest(path: Path, cfg: DataConfig, seed: int) -> None:
    """Phantom shards made by another generator version, seed or size are refused by name."""
    if cfg.phantom_studies is None:
        return
    source = json.loads((path / "manifest.json").read_text()).get("source", {})
    if source.get("kind") != "phantom":
        return
    wanted = {"num": cfg.phantom_studies, "seed": seed, "generator": GENERATOR_VERSION}
    found = {k: source.get(k, 1 if k == "generator" else None) for k in wanted}
    if found != wanted:
        raise ValueError(
            f"data.path {path}: phantom shards with {found}, but this recipe and "
            f"code make {wanted}; delete {path} to regenerate, or point data.path "
            "elsewhere"
        )


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
    with file_lock(target.parent / f".{target.name}.lock"):
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
