"""Phantom shards on first use: the demo and tiny recipes train without a data set to prepare.

The pretraining command calls `provide_phantom_shards` before the trainer starts, and the
trainer itself never generates data (training and evaluation import nothing from
`prior_dist.preparation`; an import-linter contract keeps it so)."""

from __future__ import annotations

import json
from pathlib import Path

from prior_dist.atomic import file_lock
from prior_dist.data.config import DataConfig
from prior_dist.data.run_data import first_local_source
from prior_dist.preparation.build import build_shards
from prior_dist.preparation.phantom import GENERATOR_VERSION
from prior_dist.preparation.sources import enumerate_phantom
from prior_dist.preparation.study import PrepareSettings


def provide_phantom_shards(cfg: DataConfig, log=print) -> None:
    """Generate `data.phantom_studies` phantom studies into `data.path` when it holds no
    manifest yet (one process at a time; the others find them made), or refuse phantom shards
    there that another generator version, seed or size made. Nothing to do when the recipe
    asks for none. The phantom's seed is `data.phantom_seed`, not the training seed: a seed
    sweep trains on the same data."""
    if cfg.phantom_studies is None:
        return
    path = first_local_source(cfg)
    # Several sources are shards prepared already: only a lone directory is generated.
    if len(cfg.sources()) == 1 and not (path / "manifest.json").is_file():
        with file_lock(path):
            if not (path / "manifest.json").is_file():
                _generate(cfg, path, log)
    if (path / "manifest.json").is_file():
        _check_phantom_manifest(path, cfg)


def _generate(cfg: DataConfig, path: Path, log) -> None:
    log(f"data: generating {cfg.phantom_studies} phantom studies into {path}")
    records, skipped, source = enumerate_phantom(cfg.phantom_studies, cfg.phantom_seed)
    settings = PrepareSettings(image_size=cfg.phantom_image_size, phantom_seed=cfg.phantom_seed)
    build_shards(
        records, skipped, source, settings, path, shard_size=cfg.phantom_shard_size, progress=False
    )


def _check_phantom_manifest(path: Path, cfg: DataConfig) -> None:
    """Phantom shards made by another generator version, seed or size are refused by name."""
    source = json.loads((path / "manifest.json").read_text()).get("source", {})
    if source.get("kind") != "phantom":
        return
    wanted = {"num": cfg.phantom_studies, "seed": cfg.phantom_seed, "generator": GENERATOR_VERSION}
    found = {k: source.get(k, 1 if k == "generator" else None) for k in wanted}
    if found != wanted:
        raise ValueError(
            f"data.path {path}: phantom shards with {found}, but this recipe and "
            f"code make {wanted}; delete {path} to regenerate, or point data.path "
            "elsewhere"
        )
