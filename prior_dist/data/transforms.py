"""Per-sample processing for training: image choice, augmentation, sentence shuffle, tokens.

Every random choice is drawn from a per-sample generator seeded by (seed, epoch, key), so a
sample comes out identical whichever rank or worker serves it, and resumed runs match.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prior_dist.data.images import check_pixels
from prior_dist.data.tokenize import MAX_TOKENS, tokenize_sentences
from prior_dist.seeding import stable_hash

MIMIC_MEAN, MIMIC_STD = 0.4755, 0.3011
_IMAGE_EXT = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png)$")
_LATERALITY = re.compile(r"\b(left|right)\b", re.IGNORECASE)


AugmentIn = Literal["loader", "step"]
Decoder = Literal["pil", "torchvision"]


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
    max_tokens: int = MAX_TOKENS
    max_sentences: int | None = None
    shuffle_sentences: bool = True
    # Batch shapes from a few sizes only (what compiled towers and CUDA graphs need): tokens
    # padded to a multiple of `token_bucket` (at most `max_tokens`), sentence slots to a
    # multiple of `sentence_bucket`; 0 pads to the batch's own longest. Masks keep the maths.
    token_bucket: int = 0
    sentence_bucket: int = 0
    # Where the rotation and flip are applied (the recipe's `data.augment_in`). "loader": in the
    # DataLoader worker, which ships normalised float images. "step": the worker ships uint8
    # pixels at the training size with each sample's angle (`batch["angle"]`, drawn as before
    # from the sample's seed), and `PriorLoader.finish` applies them in the training step as
    # one batched affine on its device (`apply_geometry`). "loader" here, where a loader made
    # for evaluation has nothing to rotate; a recipe's training loader defaults to "step".
    augment_in: AugmentIn = "loader"
    # "pil" (with DCT-domain downscaling of large JPEGs) or "torchvision" (`decode_image`,
    # libjpeg-turbo; resizing in torch).
    decoder: Decoder = "pil"

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
        if self.token_bucket < 0 or self.sentence_bucket < 0:
            raise ValueError("token_bucket and sentence_bucket must be >= 0")
        if self.augment_in not in ("loader", "step"):
            raise ValueError(f"augment_in must be 'loader' or 'step', got {self.augment_in!r}")
        if self.decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'pil' or 'torchvision', got {self.decoder!r}")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng(stable_hash(f"{seed}|{epoch}|{key}"))


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
        pixels = self.pixels(f"{key}.{chosen}", members[chosen], angle, flip)
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
        if cfg.augment_in == "step":
            out["angle"] = angle
        if self.label_names is not None:
            labels = meta.get("labels") or {}
            out["labels"] = [
                float("nan") if labels.get(n) is None else float(labels[n])
                for n in self.label_names
            ]
        return out

    def pixels(self, what: str, data: bytes, angle: float, flip: bool) -> torch.Tensor:
        """[1, S, S]: normalised float with the geometry applied ("loader"), or uint8 at the
        training size for the step to finish ("step")."""
        cfg, size = self.config, self.config.image_size
        try:
            image = Image.open(io.BytesIO(data))  # the header only: the pixel count check
            check_pixels(image)
            if cfg.decoder == "torchvision":
                # torchvision.io adds ~160 MB to every process that imports it: only this
                # optional decoder pays for it.
                from torchvision.io import ImageReadMode, decode_image

                raw = decode_image(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY
                )
            elif image.mode == "L" and image.size == (size, size):
                image.load()  # stored at the training size: nothing to convert or resize
            else:
                image.draft("L", (size, size))
                image = image.convert("L")
        except (
            OSError,
            ValueError,
            SyntaxError,
            RuntimeError,
            Image.DecompressionBombError,
        ) as exc:
            raise CorruptSample(f"{what}: image does not decode: {exc}") from exc
        if cfg.decoder == "torchvision":
            if raw.shape[-2:] != (size, size):
                raw = F.interpolate(
                    raw[None].float(),
                    size=(size, size),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[0]
                raw = raw.round_().clamp_(0, 255).to(torch.uint8)
            if cfg.augment_in == "step":
                return raw
            angles, flips = torch.tensor([angle]), torch.tensor([flip])
            return apply_geometry(raw[None], angles, flips, cfg.mean, cfg.std)[0]
        if cfg.augment_in == "step":
            image = squash_rotate(image, size, 0.0)
            return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).unsqueeze(0)
        image = squash_rotate(image, size, angle)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).div_(255.0)
        return pixels.sub_(cfg.mean).div_(cfg.std).unsqueeze(0)


def apply_geometry(
    images: torch.Tensor,
    angle: torch.Tensor,
    flipped: torch.Tensor,
    mean: float,
    std: float,
    turn: bool | None = None,
) -> torch.Tensor:
    """uint8 [B, 1, S, S] -> normalised float: each image rotated by its `angle` (degrees,
    counter-clockwise, as `squash_rotate`) and then mirrored where `flipped`, in one batched
    bilinear `grid_sample` on the images' device; outside the image is black, as in the loader.
    `turn`: whether any image turns, decided by the caller on host copies of the angles (no
    device read); None decides it here from `angle` and `flipped`."""
    x = images.float().div_(255.0)
    if turn is None:
        turn = bool((angle != 0).any()) or bool(flipped.any())
    angle, flipped = angle.to(x.device, torch.float32), flipped.to(x.device)
    if turn:
        theta = torch.deg2rad(-angle)
        cos, sin = theta.cos(), theta.sin()
        sign = torch.where(flipped, -1.0, 1.0)
        zero = torch.zeros_like(cos)
        matrix = torch.stack(
            [torch.stack([cos * sign, sin, zero], -1), torch.stack([-sin * sign, cos, zero], -1)],
            1,
        )
        grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x.sub_(mean).div_(std)


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


def _bucket(size: int, bucket: int) -> int:
    return -(-size // bucket) * bucket if bucket else size


def collate(
    samples: list[dict],
    pad_token_id: int,
    image_size: int,
    num_labels: int | None = None,
    augment_in: AugmentIn = "loader",
    cfg: TransformConfig | None = None,
) -> dict:
    """Pad a batch to its own longest report, or to `cfg`'s buckets; an empty list gives an
    empty batch. With the geometry left to the step, images are uint8 and `angle` holds each
    sample's rotation. `sentence_slots` is the sentence axis the text tower pools into."""
    longest = max((len(s["input_ids"]) for s in samples), default=0)
    length = longest
    if cfg is not None and cfg.token_bucket and longest:
        length = max(min(_bucket(longest, cfg.token_bucket), cfg.max_tokens), longest)
    batch_size = len(samples)
    # Filled in numpy and handed to torch once: a torch.tensor per row costs more than the row.
    ids = np.full((batch_size, length), pad_token_id, dtype=np.int64)
    mask = np.zeros((batch_size, length), dtype=np.int64)
    index = np.full((batch_size, length), -1, dtype=np.int64)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        ids[row, :n] = sample["input_ids"]
        mask[row, :n] = 1
        index[row, :n] = sample["sentence_index"]
    input_ids, attention_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    sentence_index = torch.from_numpy(index)
    num_sentences = (
        sentence_index.max(dim=1).values + 1
        if batch_size and length
        else torch.zeros(batch_size, dtype=torch.long)
    )
    images = (
        torch.stack([s["image"] for s in samples])
        if samples
        else torch.zeros(
            (0, 1, image_size, image_size),
            dtype=torch.uint8 if augment_in == "step" else torch.float32,
        )
    )
    batch = {
        "key": [s["key"] for s in samples],
        "image": images,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "sentence_index": sentence_index,
        "num_sentences": num_sentences,
        "sentence_slots": _bucket(
            int(num_sentences.max()) if batch_size else 0, cfg.sentence_bucket if cfg else 0
        ),
        "sentences": [s["sentences"] for s in samples],
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
    }
    if augment_in == "step":
        batch["angle"] = torch.tensor([s["angle"] for s in samples], dtype=torch.float32)
    if num_labels is not None:
        batch["labels"] = (
            torch.tensor([s["labels"] for s in samples], dtype=torch.float32)
            if samples
            else torch.zeros((0, num_labels))
        )
    return batch
