"""The `data` section of a recipe: where the shards are, the tokenizer, augmentation, workers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from prior_dist.data.index import parse_sources
from prior_dist.data.transforms import TransformConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    path: str = "shards/demo"
    # Generate phantom shards at `path` on first use when it holds none (demo, tiny recipes).
    phantom_studies: int | None = None
    phantom_image_size: int = 128
    phantom_shard_size: int = 256
    # "auto": a WordPiece vocabulary built from the shards (cached under <path>/wordpiece);
    # otherwise a local tokenizer directory or a hub id.
    tokenizer: str = "auto"
    vocab_size: int = 4096
    max_tokens: int = 256
    rotation_degrees: float = 5.0
    flip_probability: float = 0.0
    workers: int = 2
    mode: str | None = None
    eval_split: str = "test"

    def __post_init__(self) -> None:
        _require(
            self.phantom_studies is None or self.phantom_studies >= 10,
            f"data.phantom_studies must be >= 10 or null, got {self.phantom_studies}",
        )
        _require(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")
        _require(self.max_tokens >= 3, f"data.max_tokens must be >= 3, got {self.max_tokens}")
        _require(
            self.mode in (None, "indexed", "stream", "resampled"),
            f"data.mode must be one of [null, indexed, stream, resampled], got {self.mode!r}",
        )
        _require(
            0 <= self.flip_probability <= 1,
            f"data.flip_probability must be in [0, 1], got {self.flip_probability}",
        )

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

    def transform(self, image_size: int, train: bool) -> TransformConfig:
        """The loader's transform: augmentation and sentence shuffling only when training."""
        return TransformConfig(
            image_size=image_size,
            rotation_degrees=self.rotation_degrees if train else 0.0,
            flip_probability=self.flip_probability if train else 0.0,
            max_tokens=self.max_tokens,
            shuffle_sentences=train,
        )
