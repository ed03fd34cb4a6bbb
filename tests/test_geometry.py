"""Rotation and flip in the training step (`apply_geometry`) against the loader's PIL path, and
the torchvision decoder against PIL."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from prior_dist.data.loader import PriorLoader
from prior_dist.data.transforms import (
    CorruptSample,
    SampleTransform,
    TransformConfig,
    apply_geometry,
    squash_rotate,
)

MEAN, STD = 0.5, 0.25


def smooth_image(size: int = 48) -> Image.Image:
    """A smooth, asymmetric test card: bilinear resamplers agree on it to well under a grey
    level away from the borders."""
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = 128 + 90 * np.sin(3 * x + 1) * np.cos(2 * y) + 30 * x
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def pil_path(image: Image.Image, angle: float, flip: bool) -> np.ndarray:
    out = squash_rotate(image, image.width, angle)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (np.asarray(out, dtype=np.float32) / 255 - MEAN) / STD


@pytest.mark.parametrize("angle,flip", [(0.0, False), (0.0, True), (4.5, False), (-5.0, True)])
def test_batched_affine_matches_the_loader_rotation(angle, flip):
    image = smooth_image()
    pixels = torch.from_numpy(np.asarray(image).copy())[None, None]
    batch = pixels.repeat(2, 1, 1, 1)
    out = apply_geometry(batch, torch.tensor([angle, 0.0]), torch.tensor([flip, False]), MEAN, STD)
    expected = pil_path(image, angle, flip)
    inner = (slice(4, -4), slice(4, -4))  # the corners rotate in from outside the image
    diff = np.abs(out[0, 0].numpy() - expected)[inner] * STD * 255
    assert diff.max() < 1.5 and diff.mean() < 0.5  # grey levels
    # The second image, unrotated, is only normalised (to float rounding of the identity grid).
    np.testing.assert_allclose(out[1, 0].numpy(), pil_path(image, 0.0, False), atol=1e-4)
    # A rotation the wrong way round, or a flip left out, would be far off.
    if angle or flip:
        wrong = pil_path(image, -angle, not flip)
        assert (np.abs(out[0, 0].numpy() - wrong)[inner] * STD * 255).mean() > 5


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_torchvision_decoder_agrees_with_pil_and_rejects_corrupt_bytes(tokenizer):
    data = jpeg(smooth_image(64))
    transforms = {
        d: SampleTransform(
            tokenizer, TransformConfig(image_size=64, mean=MEAN, std=STD, decoder=d), seed=1
        )
        for d in ("pil", "torchvision")
    }
    pil = transforms["pil"].pixels("k.jpg", data, 3.0, True)
    tv = transforms["torchvision"].pixels("k.jpg", data, 3.0, True)
    diff = (pil - tv).abs()[0, 4:-4, 4:-4] * STD * 255
    assert diff.mean() < 1.0 and diff.max() < 4
    # A size other than the training size is resized in torch.
    small = transforms["torchvision"].pixels("k.jpg", jpeg(smooth_image(40)), 0.0, False)
    assert small.shape == (1, 64, 64)
    with pytest.raises(CorruptSample, match="k.jpg: image does not decode"):
        transforms["torchvision"].pixels("k.jpg", data[: len(data) // 3] + b"\0" * 50, 0.0, False)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_step_geometry_gives_the_loader_geometry_batches(phantom_dir, tokenizer, decoder):
    """Same samples, same draws: the step finishes uint8 batches into what the loader made."""
    cfg = dict(image_size=64, rotation_degrees=5.0, flip_probability=0.5, decoder=decoder)
    batches, loaders = {}, {}
    for place in ("loader", "step"):
        transform = TransformConfig(augment_in=place, **cfg)
        loaders[place] = PriorLoader(
            phantom_dir, tokenizer, 8, rank=0, world_size=1, seed=3, transform=transform
        )
        batches[place] = next(iter(loaders[place]))
    step = batches["step"]
    assert step["image"].dtype == torch.uint8 and step["angle"].abs().max() <= 5.0
    assert step["flipped"].any() and (step["angle"] != 0).all()
    assert step["key"] == batches["loader"]["key"]
    assert step["sentences"] == batches["loader"]["sentences"]  # laterality swapped alike
    cpu = torch.device("cpu")
    finished = loaders["step"].finish(step, cpu, torch.float32)
    diff = (finished["image"] - batches["loader"]["image"]).abs()[..., 6:-6, 6:-6]
    grey = diff * TransformConfig().std * 255
    if decoder == "torchvision":  # one function on both paths
        assert grey.max() < 1e-3
    else:
        assert grey.mean() < 1.0
    # A batch the workers finished passes through with its pixels as they are.
    done = loaders["loader"].finish(batches["loader"], cpu, torch.float32)
    assert torch.equal(done["image"], batches["loader"]["image"])
