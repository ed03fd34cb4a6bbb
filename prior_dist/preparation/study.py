"""Turn one study record into shard members, or a skip reason. Runs inside shardify workers."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from prior_dist.data import images as imgs
from prior_dist.preparation.phantom import Finding, make_study, render_findings
from prior_dist.preparation.reports import decode_report_bytes, extract_sections
from prior_dist.preparation.sources import StudyRecord


@dataclass(frozen=True)
class PrepareSettings:
    image_size: int = 256
    resize_mode: imgs.ResizeMode = "short"
    image_format: imgs.ImageFormat = "jpg"
    jpeg_quality: int = 95
    min_sentences: int = 1
    encoding_errors: Literal["skip", "repair"] = "skip"
    phantom_seed: int = 0
    # Larger images (by their header) are skipped as unreadable_image, never decoded.
    max_pixels: int = imgs.MAX_PIXELS
    # Images whose shorter side is smaller are noted as image_too_small and left out.
    min_image_size: int = 32
    # Longer reports (in characters, before section extraction) are skipped as report_too_long.
    max_report_chars: int = 20_000

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.resize_mode not in ("short", "square"):
            raise ValueError(f"resize_mode must be 'short' or 'square', got {self.resize_mode!r}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.min_image_size < 1 or self.max_report_chars < 1:
            raise ValueError("min_image_size and max_report_chars must be >= 1")
        if self.min_sentences < 0:
            raise ValueError(f"min_sentences must be >= 0, got {self.min_sentences}")
        if self.encoding_errors not in ("skip", "repair"):
            raise ValueError(
                f"encoding_errors must be 'skip' or 'repair', got {self.encoding_errors!r}"
            )


class Skip(Exception):
    """A study that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _report_text(record: StudyRecord, settings: PrepareSettings) -> tuple[str, list[str]]:
    notes = []
    if record.report_text is not None:
        return record.report_text, notes
    assert record.report_path is not None
    try:
        data = Path(record.report_path).read_bytes()
    except FileNotFoundError:
        raise Skip("missing_report", record.report_path) from None
    except OSError as exc:
        raise Skip("unreadable_report", f"{record.report_path}: {exc}") from None
    text, clean = decode_report_bytes(data)
    if not clean:
        if settings.encoding_errors == "skip":
            raise Skip("non_utf8_report", record.report_path)
        notes.append("non_utf8_repaired")
    return text, notes


def _encode_mask(mask) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_array(image, settings: PrepareSettings) -> bytes:
    """A generated uint8 image resized and encoded like a read one."""
    resized = imgs.resize(
        Image.fromarray(image, mode="L"), settings.image_size, settings.resize_mode
    )
    return imgs.encode(resized, settings.image_format, settings.jpeg_quality)


def _encoded_images(
    record: StudyRecord, settings: PrepareSettings, notes: list[str]
) -> tuple[list[bytes], list[str]]:
    """The record's images resized and encoded, with their views; a missing or unreadable image
    is noted and left out. Raises `Skip` when none is left."""
    encoded: list[bytes] = []
    views: list[str] = []
    for i, path in enumerate(record.images):
        try:
            data = imgs.read_bytes(path)
            encoded.append(
                imgs.prepare_image(
                    data,
                    Path(path).suffix,
                    settings.image_size,
                    settings.resize_mode,
                    settings.image_format,
                    settings.jpeg_quality,
                    settings.max_pixels,
                    settings.min_image_size,
                )
            )
            views.append(record.views[i] if i < len(record.views) else "")
        except FileNotFoundError:
            notes.append("missing_image")
        except imgs.ImageTooSmall:
            notes.append("image_too_small")
        except (OSError, imgs.ImageDecodeError):
            notes.append("unreadable_image")
    if not encoded:
        raise Skip(notes[-1] if notes else "no_image", record.key)
    return encoded, views


def prepare_study(
    record: StudyRecord, settings: PrepareSettings
) -> tuple[dict[str, bytes], list[str]]:
    """Members ({extension: bytes}) of the sample for `record`, and image-level notes.

    Raises `Skip` with a reason when the study cannot be used.
    """
    phantom = None
    if record.phantom_index is not None:
        phantom = make_study(
            record.phantom_index, seed=settings.phantom_seed, size=settings.image_size
        )
        text, notes = phantom.report, []
    else:
        text, notes = _report_text(record, settings)
    if not text.strip():
        raise Skip("empty_report", record.key)
    if len(text) > settings.max_report_chars:
        raise Skip("report_too_long", f"{record.key}: {len(text)} characters")
    parsed = extract_sections(text)
    if not parsed.has_sections:
        raise Skip("no_sections", record.key)
    if not parsed.sentences:
        raise Skip("empty_report", record.key)
    if len(parsed.sentences) < settings.min_sentences:
        raise Skip("too_few_sentences", f"{record.key}: {len(parsed.sentences)}")

    drawn = None
    if record.render_findings is not None:
        findings = [Finding(**f) for f in record.render_findings]
        drawn = render_findings(findings, record.key, settings.image_size)
    if phantom is not None or drawn is not None:
        arrays = phantom.images if phantom is not None else [drawn[0]]
        encoded = [_encode_array(im, settings) for im in arrays]
        views = ["PA"] * len(encoded)
    else:
        encoded, views = _encoded_images(record, settings, notes)

    meta = {
        "id": record.key,
        "subject_id": record.subject_id,
        "views": views,
        "sections": {"findings": parsed.findings, "impression": parsed.impression},
        "sentences": parsed.sentences,
        "split": record.split,
    }
    if record.labels is not None:
        meta["labels"] = record.labels
    members: dict[str, bytes] = {}
    ext = settings.image_format
    if len(encoded) == 1:
        members[ext] = encoded[0]
    else:
        for i, data in enumerate(encoded):
            members[f"{i}.{ext}"] = data
    if phantom is not None:
        meta["labels"] = phantom.labels
        meta["boxes"] = phantom.boxes
        meta["findings"] = [f.__dict__ for f in phantom.findings]
        members["mask.png"] = _encode_mask(phantom.mask)
    if drawn is not None:
        meta["synthetic_image"] = True
        meta["findings"] = record.render_findings
        members["mask.png"] = _encode_mask(drawn[1])
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members, notes
