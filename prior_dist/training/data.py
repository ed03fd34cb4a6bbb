"""Training data: phantom shards on first use, the tokenizer, and the per-rank loaders."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

from prior_dist.data.loader import PriorLoader
from prior_dist.data.transforms import TransformConfig
from prior_dist.training.recipe import DataConfig


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


def data_sources(cfg: DataConfig) -> list[str]:
    """`data.path` as a list of loader sources: `DIR`, `DIR:WEIGHT`, comma-separated."""
    entries = [e.strip() for e in str(cfg.path).split(",") if e.strip()]
    if not entries:
        raise ValueError("data.path is empty")
    return entries


def ensure_phantom_shards(cfg: DataConfig, seed: int, log=print) -> Path:
    """The first local source directory (phantom shards generated there first when asked);
    every local source must hold a manifest.json."""
    from prior_dist.data.build import build_shards
    from prior_dist.data.loader import parse_sources
    from prior_dist.data.prepare import PrepareSettings
    from prior_dist.data.sources import enumerate_phantom

    sources = parse_sources(data_sources(cfg))
    local = [Path(s.location) for s in sources if not s.remote]
    for extra in local[1:]:
        if not (extra / "manifest.json").is_file():
            raise ValueError(f"data.path source {extra}: no manifest.json")
    if not local:
        raise ValueError("data.path: at least one local shard directory is needed (for the "
                         "manifest counts and the tokenizer)")
    path = local[0]
    if (path / "manifest.json").is_file():
        _check_phantom_manifest(path, cfg, seed)
        return path
    if cfg.phantom_studies is None or len(sources) > 1:
        raise ValueError(f"data.path {path}: no manifest.json (prepare data with "
                         "`python -m prior_dist.shardify`, or set data.phantom_studies to "
                         "generate phantom shards there)")
    with file_lock(path.parent / f".{path.name}.lock"):
        if not (path / "manifest.json").is_file():
            log(f"data: generating {cfg.phantom_studies} phantom studies into {path}")
            records, skipped, source = enumerate_phantom(cfg.phantom_studies, seed)
            build_shards(records, skipped, source,
                         PrepareSettings(image_size=cfg.phantom_image_size, phantom_seed=seed),
                         path, shard_size=cfg.phantom_shard_size, progress=False)
    return path


def _check_phantom_manifest(path: Path, cfg: DataConfig, seed: int) -> None:
    """Phantom shards made by another generator version, seed or size are refused by name."""
    import json

    from prior_dist.data.phantom import GENERATOR_VERSION

    if cfg.phantom_studies is None:
        return
    source = json.loads((path / "manifest.json").read_text()).get("source", {})
    if source.get("kind") != "phantom":
        return
    wanted = {"num": cfg.phantom_studies, "seed": seed, "generator": GENERATOR_VERSION}
    found = {k: source.get(k, 1 if k == "generator" else None) for k in wanted}
    if found != wanted:
        raise ValueError(f"data.path {path}: phantom shards with {found}, but this recipe and "
                         f"code make {wanted}; delete {path} to regenerate, or point data.path "
                         "elsewhere")


def load_training_tokenizer(cfg: DataConfig, shards: Path):
    from prior_dist.data.tokenize import build_wordpiece, load_tokenizer

    if cfg.tokenizer != "auto":
        return load_tokenizer(cfg.tokenizer)
    with file_lock(shards / ".wordpiece.lock"):
        return build_wordpiece(shards, shards / "wordpiece", vocab_size=cfg.vocab_size)


def transform_config(cfg: DataConfig, image_size: int, train: bool) -> TransformConfig:
    return TransformConfig(image_size=image_size,
                           rotation_degrees=cfg.rotation_degrees if train else 0.0,
                           flip_probability=cfg.flip_probability if train else 0.0,
                           max_tokens=cfg.max_tokens, shuffle_sentences=train)


def training_loader(cfg: DataConfig, tokenizer, micro_batch_size: int,
                    image_size: int, seed: int, rank: int, world_size: int) -> PriorLoader:
    # Drop the ragged last batch: every rank must hold the same number of samples for the
    # gathered contrastive loss and for batch statistics to match the global batch.
    return PriorLoader(data_sources(cfg), tokenizer, micro_batch_size, split="train",
                       transform=transform_config(cfg, image_size, train=True), seed=seed,
                       rank=rank, world_size=world_size, num_workers=cfg.workers, mode=cfg.mode,
                       last_batch="drop")
