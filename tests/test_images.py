import io

import numpy as np
import pytest
from imaging import dicom_bytes, gradient, jpeg_bytes, png_bytes
from PIL import Image

from prior_dist.data import images


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)


def test_jpeg_draft_resize_matches_full_decode():
    big = gradient(1200, 1000)
    data = jpeg_bytes(big)
    fast = images.decode_grayscale(data, ".jpg", size=256)
    # DCT-domain reduction: decoded at 1/4 scale (>= 256 on both sides), not at full size.
    assert min(fast.size) >= 256 and max(fast.size) < 1000
    out = decode(images.prepare_image(data, ".jpg", 256, "short", "png"))
    reference = np.asarray(images.full_decode_resize(data, 256), dtype=np.float64)
    assert out.shape == reference.shape == (307, 256)
    assert np.abs(out - reference).mean() < 2.0


def test_square_mode_and_formats():
    data = png_bytes(gradient(300, 200))
    out = decode(images.prepare_image(data, ".png", 128, "square", "jpg", quality=90))
    assert out.shape == (128, 128)


def test_png16_is_stretched_to_8_bit():
    array = (gradient(64, 64, 4095)).astype(np.uint16)  # 12-bit data in a 16-bit container
    image = images.decode_grayscale(png_bytes(array), ".png")
    values = np.asarray(image)
    assert image.mode == "L" and values.min() == 0 and values.max() == 255


def test_dicom_bits_stored_scaling_and_monochrome1():
    array = gradient(32, 32, 4095).astype(np.uint16)
    mono2 = images.dicom_to_uint8(dicom_bytes(array, bits_stored=12))
    assert mono2[0, 0] == 0 and mono2[-1, -1] == 255  # 4095 / 4095, not / 65535
    mono1 = images.dicom_to_uint8(dicom_bytes(array, bits_stored=12, photometric="MONOCHROME1"))
    assert np.array_equal(mono1, 255 - mono2)


def test_dicom_window_applied():
    array = np.full((8, 8), 1000, dtype=np.uint16)
    array[:, 4:] = 3000
    out = images.dicom_to_uint8(dicom_bytes(array, bits_stored=12, window=(1000.5, 2)))
    # Window centred at the low value: low pixels map to mid-grey, high ones saturate.
    assert out[0, 7] == 255 and 100 < out[0, 0] < 160
    via_decoder = np.asarray(
        images.decode_grayscale(dicom_bytes(array, window=(2000, 4000)), ".dcm")
    )
    assert via_decoder[0, 0] < via_decoder[0, 7]


def test_dicom_sigmoid_window_differs_from_linear():
    """VOILUTFunction SIGMOID: a pixel one width above the centre is not saturated (it is with
    LINEAR), and the centre maps to mid-grey."""
    array = np.array([[1000, 2000, 3000]] * 4, dtype=np.uint16)
    window = (2000, 1000)
    linear = images.dicom_to_uint8(dicom_bytes(array, window=window))
    sigmoid = images.dicom_to_uint8(dicom_bytes(array, window=window, voi_function="SIGMOID"))
    assert list(linear[0]) == [0, 128, 255]
    assert sigmoid[0, 1] == 128 and 0 < sigmoid[0, 0] < 10 and 245 < sigmoid[0, 2] < 255


def test_dicom_modality_rescale_comes_before_the_window():
    """The window is in rescaled units (PS3.3 C.11): stored 1000 with slope 2, intercept -1024
    is 976, the window's centre."""
    array = np.array([[900, 1000, 1100]] * 4, dtype=np.uint16)
    out = images.dicom_to_uint8(dicom_bytes(array, window=(976, 200), slope=2.0, intercept=-1024.0))
    assert list(out[0]) == [0, 128, 255]


def test_dicom_voi_lut_sequence_is_applied():
    """A VOI LUT that inverts the 12-bit range inverts the picture."""
    array = gradient(16, 16, 4095).astype(np.uint16)
    plain = images.dicom_to_uint8(dicom_bytes(array))
    inverted = images.dicom_to_uint8(dicom_bytes(array, voi_lut=4095 - np.arange(4096)))
    assert np.abs(inverted.astype(int) - (255 - plain.astype(int))).max() <= 1


@pytest.mark.parametrize(
    "data,what",
    [
        (b"", "zero-byte"),
        (b"not an image at all", "undecodable"),
        (jpeg_bytes(gradient(64, 64))[:200], "undecodable"),
    ],
)
def test_bad_images_raise_named_errors(data, what):
    with pytest.raises(images.ImageDecodeError, match=what):
        images.prepare_image(data, ".jpg", 32)


def test_broken_dicom_raises():
    with pytest.raises(images.ImageDecodeError, match="DICOM"):
        images.decode_grayscale(b"\0" * 128 + b"DICM" + b"\x02\x00" * 10, ".dcm")


def test_huge_image_is_refused_from_its_header():
    from imaging import png_claiming_size

    bomb = png_claiming_size(20000, 20000)  # 400M pixels claimed, 100-odd bytes on disk
    with pytest.raises(images.ImageDecodeError, match="too large"):
        images.decode_grayscale(bomb, ".png")
    small = png_bytes(gradient(40, 50))
    with pytest.raises(images.ImageDecodeError, match="2000 pixels, over the limit of 1000"):
        images.prepare_image(small, ".png", 32, max_pixels=1000)
    assert images.decode_grayscale(small, ".png", max_pixels=2000).size == (50, 40)


def test_huge_shard_member_is_a_corrupt_sample():
    import json

    from imaging import png_claiming_size

    from prior_dist.data.transforms import CorruptSample, SampleTransform, TransformConfig

    class Tokenizer:  # the transform needs only what tokenising one sentence uses
        pad_token_id = 0

    transform = SampleTransform(Tokenizer(), TransformConfig(image_size=32), seed=0)
    members = {
        "json": json.dumps({"sentences": ["Clear."]}).encode(),
        "png": png_claiming_size(20000, 20000),
    }
    with pytest.raises(CorruptSample, match="k.png: image does not decode"):
        transform("k", members, epoch=0)
