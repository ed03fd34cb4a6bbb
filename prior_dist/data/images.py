"""Image decoding for shard preparation: JPEG, PNG (8/16-bit) and DICOM to 8-bit grayscale.

Large JPEGs are downscaled in the DCT domain (PIL ``draft``) before the final resize, which is
what makes shardify several times faster than a full decode of a 3000x2500 radiograph.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

ResizeMode = Literal["short", "square"]
ImageFormat = Literal["jpg", "png"]

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the reason."""


# Pillow's decompression-bomb threshold (89.5M pixels): a larger image, e.g. 20000 x 20000, is
# refused from its header before any pixel is decoded; shardify's --max-pixels sets another.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def _target_size(width: int, height: int, size: int, mode: ResizeMode) -> tuple[int, int]:
    if mode == "square":
        return size, size
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _is_dicom(data: bytes, suffix: str) -> bool:
    return suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM"


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def dicom_to_uint8(data: bytes) -> np.ndarray:
    """Decode DICOM bytes to 8-bit grayscale: modality LUT, VOI LUT or window, MONOCHROME1."""
    # pydicom takes a while to import and only DICOM inputs need it.
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken or compressed data
        raise ImageDecodeError(f"DICOM pixel data unreadable: {type(exc).__name__}: {exc}") from exc
    if stored.ndim == 3 and ds.get("SamplesPerPixel", 1) == 3:
        stored = stored.mean(axis=-1)
    elif stored.ndim != 2:
        raise ImageDecodeError(f"DICOM has {stored.ndim} pixel dimensions; expected one 2-D frame")
    # PS3.3 C.11: the modality LUT (rescale or LUT sequence) first, then the VOI transform
    # (LUT sequence, or a LINEAR / LINEAR_EXACT / SIGMOID window) on its output.
    values = apply_modality_lut(stored, ds).astype(np.float64)
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        try:
            values, (lo, hi) = _voi(values, ds, apply_voi_lut)
        except Exception as exc:  # pydicom raises many types for malformed VOI attributes
            raise ImageDecodeError(f"DICOM VOI LUT/window unusable: {exc}") from exc
    else:
        bits = int(ds.get("BitsStored", 8 * stored.dtype.itemsize))
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        if ds.get("PixelRepresentation", 0) == 1:
            raw_lo, raw_hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            raw_lo, raw_hi = 0, 2**bits - 1
        lo, hi = sorted((intercept + slope * raw_lo, intercept + slope * raw_hi))
    pixels = _to_uint8(values, lo, hi)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels


def _voi(values: np.ndarray, ds, apply_voi_lut) -> tuple[np.ndarray, tuple[float, float]]:
    """pydicom's VOI transform of modality-LUT output, and its output range: a VOI LUT's is
    0 .. 2^bits - 1 (LUT Descriptor); a window's is where it sends the extremes of any input
    (LINEAR, LINEAR_EXACT and SIGMOID alike)."""
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds, prefer_lut=True)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return out.astype(np.float64), (0.0, float(2**bits - 1))
    with np.errstate(over="ignore"):  # SIGMOID at the extremes: exp overflows to its limit
        out = apply_voi_lut(values, ds, prefer_lut=False)
        ends = apply_voi_lut(np.array([-1e15, 1e15]), ds, prefer_lut=False)
    lo, hi = sorted(float(v) for v in ends)
    return out.astype(np.float64), (lo, hi)


def decode_grayscale(
    data: bytes,
    suffix: str = "",
    size: int | None = None,
    mode: ResizeMode = "short",
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode image bytes to an 8-bit grayscale PIL image.

    When `size` is given and the file is a JPEG, the decoder downscales in the DCT domain to
    the smallest power-of-two reduction still at least the target size. An image of more than
    `max_pixels` pixels (read from its header, before any decoding) raises `ImageDecodeError`.
    """
    if not data:
        raise ImageDecodeError("zero-byte image")
    if _is_dicom(data, suffix):
        return Image.fromarray(dicom_to_uint8(data), mode="L")
    try:
        image = Image.open(io.BytesIO(data))
        check_pixels(image, max_pixels)
        if size is not None and image.format == "JPEG":
            image.draft("L", _target_size(image.width, image.height, size, mode))
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"undecodable image: {exc}") from exc
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit PNG/TIFF: stretch the actual pixel range (no header says how many bits are
        # significant, and 12-bit data in 16-bit containers is the common case).
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(
            _to_uint8(values, float(values.min()), float(values.max())), mode="L"
        )
    if image.mode != "L":
        image = image.convert("L")
    return image


class ImageTooSmall(ImageDecodeError):
    """An image whose shorter side is under the minimum (a thumbnail or a placeholder)."""


def check_min_side(image: Image.Image, min_side: int) -> None:
    if min(image.width, image.height) < min_side:
        raise ImageTooSmall(
            f"image too small: {image.width}x{image.height}, under {min_side} px on its shorter "
            "side (--min-image-size)"
        )


def check_pixels(image: Image.Image, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an opened (not yet decoded) image of more than `max_pixels` pixels."""
    if image.width * image.height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {image.width}x{image.height} = {image.width * image.height} "
            f"pixels, over the limit of {max_pixels} (--max-pixels)"
        )


def resize(image: Image.Image, size: int, mode: ResizeMode = "short") -> Image.Image:
    """Resize to `size` on the short side (aspect kept) or to `size` x `size` (squashed)."""
    target = _target_size(image.width, image.height, size, mode)
    if (image.width, image.height) == target:
        return image
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=None)


def encode(image: Image.Image, fmt: ImageFormat = "jpg", quality: int = 95) -> bytes:
    """Encode an 8-bit grayscale image as JPEG or PNG bytes."""
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image format must be 'jpg' or 'png', got {fmt!r}")
    return buffer.getvalue()


def prepare_image(
    data: bytes,
    suffix: str,
    size: int,
    mode: ResizeMode = "short",
    fmt: ImageFormat = "jpg",
    quality: int = 95,
    max_pixels: int = MAX_PIXELS,
    min_side: int = 1,
) -> bytes:
    """Decode once, convert to 8-bit grayscale, resize, re-encode: the shardify image path."""
    image = decode_grayscale(data, suffix, size=size, mode=mode, max_pixels=max_pixels)
    check_min_side(image, min_side)
    return encode(resize(image, size, mode), fmt, quality)


def read_bytes(path: str | Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def full_decode_resize(data: bytes, size: int) -> Image.Image:
    """Plain full decode + resize (no DCT-domain reduction): the baseline the benchmark uses."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image = image.convert("L")
    return resize(image, size, "short")
