"""Per-sample processing for training: image choice, augmentation, sentence shuffle, tokens.

Every random choice is drawn from a per-sample generator seeded by (seed, epoch, key), so a
sample comes out identical whichever rank or worker serves it, and resumed runs match.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from prior_dist.data.images import check_pixels
from prior_dist.data.tokenize import tokenize_sentences

MIMIC_MEAN, MIMIC_STD = 0.4755, 0.3011
_IMAGE_EXT = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png)$")
_LATERALITY = re.compile(r"\b(left|right)\b", re.IGNORECASE)


class CorruptSample(ValueError):
    """A sample whose bytes cannot be used (bad image, bad JSON, truncated member)."""


@dataclass(frozen=True)
class TransformConfig:
    image_size: int = 224
    rotation_degrees: float = 5.0
    # Off by default: a flip mirrors the anatomy the report calls left or right. When on,
    # "left" and "right" are swapped in the sentences of flipped samples.
    flip_probability: float = 0.0
    mean: float = MIMIC_MEAN
    std: float = MIMIC_STD
    max_tokens: int = 256
    max_sentences: int | None = None
    shuffle_sentences: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if self.rotation_degrees < 0:
            raise ValueError(f"rotation_degrees must be >= 0, got {self.rotation_degrees}")
        if self.std <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3, got {self.max_tokens}")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1 or None, got {self.max_sentences}")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}|{epoch}|{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def swap_laterality(sentence: str) -> str:
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LATERALITY.sub(swap, sentence)


def image_members(members: dict[str, bytes]) -> list[str]:
    names = [ext for ext in members if _IMAGE_EXT.match(ext)]
    return sorted(names, key=lambda e: int(_IMAGE_EXT.match(e).group(1) or 0))


def squash_rotate(image: Image.Image, size: int, angle: float) -> Image.Image:
    """Squash-resize to `size` x `size` and rotate by `angle` degrees (counter-clockwise, as
    PIL's `rotate`) in one bilinear pass: one affine map from output to input pixels."""
    if not angle:
        if image.size == (size, size):
            return image
        return image.resize((size, size), Image.Resampling.BILINEAR)
    sx, sy = image.width / size, image.height / size
    theta = -math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    centre = size / 2
    coefficients = (
        sx * cos,
        sx * sin,
        sx * (centre - cos * centre - sin * centre),
        -sy * sin,
        sy * cos,
        sy * (centre + sin * centre - cos * centre),
    )
    return image.transform(
        (size, size),
        Image.Transform.AFFINE,
        coefficients,
        resample=Image.Resampling.BILINEAR,
        fillcolor=0,
    )


class SampleTransform:
    """Turns a sample's raw members into model inputs (image tensor, token ids, metadata)."""

    def __init__(
        self,
        tokenizer,
        config: TransformConfig,
        seed: int = 0,
        label_names: list[str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.label_names = list(label_names) if label_names else None
        self.token_cache: dict[str, list[int]] = {}

    def __call__(self, key: str, members: dict[str, bytes], epoch: int) -> dict:
        cfg = self.config
        rng = sample_rng(self.seed, epoch, key)
        try:
            meta = json.loads(members["json"])
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptSample(f"{key}: metadata unreadable: {exc}") from exc
        _check_metadata(key, meta)
        choices = image_members(members)
        if not choices:
            raise CorruptSample(f"{key}: no image member")
        chosen = choices[int(rng.integers(len(choices)))]
        angle = float(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
        flip = bool(rng.random() < cfg.flip_probability)
        try:
            image = Image.open(io.BytesIO(members[chosen]))
            check_pixels(image)
            image.draft("L", (cfg.image_size, cfg.image_size))
            image = image.convert("L")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise CorruptSample(f"{key}.{chosen}: image does not decode: {exc}") from exc
        image = squash_rotate(image, cfg.image_size, angle)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).div_(255.0)
        pixels = pixels.sub_(cfg.mean).div_(cfg.std).unsqueeze(0)

        sentences = list(meta.get("sentences", []))
        if cfg.shuffle_sentences and len(sentences) > 1:
            sentences = [sentences[i] for i in rng.permutation(len(sentences))]
        if cfg.max_sentences is not None:
            sentences = sentences[: cfg.max_sentences]
        if flip:
            sentences = [swap_laterality(s) for s in sentences]
        input_ids, sentence_index = tokenize_sentences(
            self.tokenizer, sentences, cfg.max_tokens, self.token_cache
        )
        kept = max(sentence_index) + 1
        out = {
            "key": key,
            "image": pixels,
            "input_ids": input_ids,
            "sentence_index": sentence_index,
            "sentences": sentences[:kept],
            "flipped": flip,
        }
        if self.label_names is not None:
            labels = meta.get("labels") or {}
            out["labels"] = [
                float("nan") if labels.get(n) is None else float(labels[n])
                for n in self.label_names
            ]
        return out


def _check_metadata(key: str, meta) -> None:
    """A sample's JSON must be an object with `sentences` a list of text and `labels` an object
    of name -> number or null: anything else is a corrupt sample (a string of sentences would
    otherwise be read character by character)."""
    if not isinstance(meta, dict):
        raise CorruptSample(f"{key}: metadata must be a JSON object, got {type(meta).__name__}")
    sentences = meta.get("sentences", [])
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise CorruptSample(f"{key}: sentences must be a list of text, got {sentences!r:.60}")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
        for v in labels.values()
    ):
        raise CorruptSample(f"{key}: labels must map names to numbers or null, got {labels!r:.60}")


def collate(
    samples: list[dict], pad_token_id: int, image_size: int, num_labels: int | None = None
) -> dict:
    """Pad a batch to its own longest report; an empty list gives an empty batch."""
    length = max((len(s["input_ids"]) for s in samples), default=0)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    sentence_index = torch.full((batch_size, length), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.tensor(sample["input_ids"])
        attention_mask[row, :n] = 1
        sentence_index[row, :n] = torch.tensor(sample["sentence_index"])
    images = (
        torch.stack([s["image"] for s in samples])
        if samples
        else torch.zeros((0, 1, image_size, image_size))
    )
    batch = {
        "key": [s["key"] for s in samples],
        "image": images,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "sentence_index": sentence_index,
        "num_sentences": (
            sentence_index.max(dim=1).values + 1
            if batch_size and length
            else torch.zeros(batch_size, dtype=torch.long)
        ),
        "sentences": [s["sentences"] for s in samples],
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
    }
    if num_labels is not None:
        batch["labels"] = (
            torch.tensor([s["labels"] for s in samples], dtype=torch.float32)
            if samples
            else torch.zeros((0, num_labels))
        )
    return batch
