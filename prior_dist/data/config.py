"""The `data` section of a recipe: where the shards are, the tokenizer, augmentation, workers."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt
from pydantic.dataclasses import dataclass

from prior_dist.data.index import Mode, parse_sources
from prior_dist.data.tokenize import MAX_TOKENS
from prior_dist.data.transforms import AugmentIn, Decoder, TransformConfig
from prior_dist.schema import SECTION, Fraction


@dataclass(frozen=True, config=SECTION)
class DataConfig:
    path: str = "shards/demo"
    # Generate phantom shards at `path` on first use when it holds none (demo, tiny recipes).
    phantom_studies: Annotated[int, Field(ge=10)] | None = None
    # The phantom generator's seed (the data set), apart from train.seed (the run).
    phantom_seed: int = 0
    phantom_image_size: PositiveInt = 128
    phantom_shard_size: PositiveInt = 256
    # "auto": a WordPiece vocabulary built from the shards (cached under <path>/wordpiece);
    # otherwise a local tokenizer directory or a hub id.
    tokenizer: str = "auto"
    vocab_size: PositiveInt = 4096
    # [CLS], one token, [SEP] at least.
    max_tokens: Annotated[int, Field(ge=3)] = MAX_TOKENS
    # Fixed batch shapes (compiled towers recompile per shape): reports padded to a multiple
    # of `token_bucket` tokens (at most max_tokens) and `sentence_bucket` sentence slots; 0 pads
    # to the batch's longest. Padding is masked: the losses do not change.
    token_bucket: NonNegativeInt = 64
    sentence_bucket: NonNegativeInt = 16
    rotation_degrees: NonNegativeFloat = 5.0
    flip_probability: Fraction = 0.0
    # Where training applies rotation and flip: "step" (the training step, one batched affine
    # on the accelerator; the loader ships uint8) or "loader" (PIL in the DataLoader workers).
    augment_in: AugmentIn = "step"
    # "pil" or "torchvision" (libjpeg-turbo) image decoding in the loader.
    decoder: Decoder = "pil"
    # DataLoader workers per rank; "auto": the rank's share of the node's cores less one for
    # the rank's own thread, at most 8 (`default_workers`).
    workers: NonNegativeInt | Literal["auto"] = "auto"
    # null: stream for remote sources, indexed otherwise.
    mode: Mode | None = None

    def sources(self) -> list[str]:
        """`path` as a list of loader sources: `DIR`, `DIR:WEIGHT`, comma-separated."""
        entries = [e.strip() for e in str(self.path).split(",") if e.strip()]
        if not entries:
            raise ValueError("data.path is empty")
        return entries

    def anchored(self, base: str | Path) -> DataConfig:
        """This config with every local source of `path` made absolute against `base` (weights
        and remote URLs kept), and `tokenizer` too when it names a directory there: a run
        directory then reads the same from any working directory."""
        entries = []
        for source in parse_sources(self.sources()):
            location = source.location if source.remote else str(Path(base, source.location))
            location = location if source.remote else str(Path(location).resolve())
            entries.append(location if source.weight == 1.0 else f"{location}:{source.weight:g}")
        tokenizer = self.tokenizer
        if tokenizer != "auto" and Path(base, tokenizer).is_dir():
            tokenizer = str(Path(base, tokenizer).resolve())
        return replace(self, path=",".join(entries), tokenizer=tokenizer)

    def worker_count(self) -> int:
        """`workers` as a number for this process."""
        return default_workers() if self.workers == "auto" else self.workers

    def transform(self, image_size: int, train: bool) -> TransformConfig:
        """The loader's transform: augmentation and sentence shuffling only when training."""
        return TransformConfig(
            image_size=image_size,
            rotation_degrees=self.rotation_degrees if train else 0.0,
            flip_probability=self.flip_probability if train else 0.0,
            max_tokens=self.max_tokens,
            token_bucket=self.token_bucket,
            sentence_bucket=self.sentence_bucket,
            shuffle_sentences=train,
            augment_in=self.augment_in if train else "loader",
            decoder=self.decoder,
        )


def default_workers(
    usable: int | None = None, node: int | None = None, local_ranks: int | None = None
) -> int:
    """Loader workers for one rank: its cores less one for the rank's own thread, at most 8.

    A rank's cores are those it may run on (`usable`, its affinity) when the launcher bound it
    to a subset of the node's `node` cores; unbound, the node's ranks (`local_ranks`,
    LOCAL_WORLD_SIZE) share them evenly."""
    usable = len(os.sched_getaffinity(0)) if usable is None else usable
    node = (os.cpu_count() or usable) if node is None else node
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_ranks is None else local_ranks
    cores = usable if usable < node else node // max(local_ranks, 1)
    return max(0, min(8, cores - 1))
