"""Data-path benchmarks, each a ratio measured side by side in one run on one core.

    python bench/data_pipeline.py [--studies 384] [--full-res 24] [--out bench/results/data.json]

1. loader samples/s against raw PIL decode of the same stored JPEG bytes (target >= 0.75), with
   shards stored at the training size (`--image-size 224 --resize square`), in each setting:
   geometry in the loader or in the step, PIL or torchvision decoding;
2. shardify's image path (DCT-domain draft + resize) on full-resolution JPEGs against a plain
   full decode + resize (target >= 3x);
3. the loader against a map-style dataset that decodes full-resolution JPEGs and tokenises the
   joined report per item, padded to 256 (the reference design): the ratio is reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_image  # noqa: E402

from prior_dist.data import images as imgs  # noqa: E402
from prior_dist.data.loader import PriorLoader  # noqa: E402
from prior_dist.data.tokenize import build_wordpiece  # noqa: E402
from prior_dist.data.transforms import (  # noqa: E402
    MIMIC_MEAN,
    MIMIC_STD,
    TransformConfig,
    apply_geometry,
)
from prior_dist.preparation.build import build_shards  # noqa: E402
from prior_dist.preparation.phantom import make_study  # noqa: E402
from prior_dist.preparation.sources import enumerate_phantom  # noqa: E402
from prior_dist.preparation.study import PrepareSettings  # noqa: E402

torch.set_num_threads(1)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stored_jpegs(shards: Path) -> list[bytes]:
    jpegs = []
    for tar_path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            jpegs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return jpegs


def bench_loader_vs_raw_decode(shards: Path, tokenizer, batch: int, size: int) -> dict:
    """The loader's samples/s in each setting against a bare decode of the same JPEG bytes,
    all measured in one run (best of 3). The ratio's baseline is PIL's decode, the same one
    the README measured before; torchvision's decode is printed beside it."""
    jpegs = stored_jpegs(shards)
    tv_bytes = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]

    def run_pil():
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("L").load()

    def run_tv():
        for data in tv_bytes:
            decode_image(data, mode=ImageReadMode.GRAY)

    raw = {"pil": len(jpegs) / best_of(run_pil), "torchvision": len(jpegs) / best_of(run_tv)}
    out = {"raw_decode_samples_per_s": raw, "image_size": size, "settings": {}}
    for geometry in ("loader", "step"):
        for decoder in ("pil", "torchvision"):
            transform = TransformConfig(image_size=size, augment_in=geometry, decoder=decoder)
            loader = PriorLoader(
                shards, tokenizer, batch, rank=0, world_size=1, num_workers=0, transform=transform
            )
            n = len(loader.index)
            rate = n / best_of(lambda loader=loader: [None for _ in loader])
            out["settings"][f"augment_in={geometry}, decoder={decoder}"] = {
                "loader_samples_per_s": rate,
                "ratio_to_pil_decode": rate / raw["pil"],
                "ratio_to_torchvision_decode": rate / raw["torchvision"],
            }
    # What the step pays instead, per sample, on this CPU (on a GPU it is one small kernel).
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8)
    angles, flips = torch.empty(batch).uniform_(-5, 5), torch.zeros(batch, dtype=torch.bool)
    seconds = best_of(lambda: apply_geometry(images, angles, flips, MIMIC_MEAN, MIMIC_STD), 5)
    out["step_geometry_cpu_ms_per_sample"] = 1000 * seconds / batch
    out["target"] = "loader (augment_in=step) / raw PIL decode >= 0.75"
    return out


def full_res_jpegs(directory: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        study = make_study(i, seed=1, size=512)
        image = Image.fromarray(study.images[0]).resize((2500, 3000), Image.Resampling.BICUBIC)
        path = directory / f"full_{i:04d}.jpg"
        image.save(path, quality=95)
        paths.append(path)
    return paths


def bench_shardify_image_path(paths: list[Path]) -> dict:
    blobs = [p.read_bytes() for p in paths]
    fast = best_of(lambda: [imgs.prepare_image(b, ".jpg", 256) for b in blobs], 3)
    plain = best_of(lambda: [imgs.encode(imgs.full_decode_resize(b, 256)) for b in blobs], 3)
    return {
        "draft_images_per_s": len(blobs) / fast,
        "full_decode_images_per_s": len(blobs) / plain,
        "speedup": plain / fast,
        "target": ">= 3x",
        "image": "2500x3000 JPEG q95",
    }


class ReferenceMapDataset(torch.utils.data.Dataset):
    """The reference design: full-resolution JPEG decode and joined-report tokenisation per item."""

    def __init__(self, paths, reports, tokenizer):
        self.paths, self.reports, self.tokenizer = paths, reports, tokenizer

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.open(self.paths[i]).convert("L").resize((224, 224), Image.Resampling.BILINEAR)
        image = image.rotate(float(np.random.uniform(-5, 5)), resample=Image.Resampling.BILINEAR)
        pixels = (
            torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            .sub(MIMIC_MEAN)
            .div(MIMIC_STD)
        )
        tokens = self.tokenizer(
            self.reports[i],
            padding="max_length",
            max_length=256,
            truncation=True,
            return_tensors="pt",
        )
        return pixels.unsqueeze(0), tokens["input_ids"][0], tokens["attention_mask"][0]


def bench_loader_vs_reference(paths, shards: Path, tokenizer, batch: int) -> dict:
    reports = [" ".join(make_study(i, seed=1).report.split()) for i in range(len(paths))]
    reference = torch.utils.data.DataLoader(
        ReferenceMapDataset(paths, reports, tokenizer), batch_size=batch
    )
    loader = PriorLoader(shards, tokenizer, batch, rank=0, world_size=1, num_workers=0)
    t_ref = best_of(lambda: [None for _ in reference], 2)
    t_ours = best_of(lambda: [None for _ in loader], 2)
    ours, ref = len(loader.index) / t_ours, len(paths) / t_ref
    return {"loader_samples_per_s": ours, "reference_samples_per_s": ref, "ratio": ours / ref}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=384)
    parser.add_argument("--full-res", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--image-size", type=int, default=224, help="training size; shards stored at it, square"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records, skipped, source = enumerate_phantom(args.studies, seed=1)
        build_shards(
            records,
            skipped,
            source,
            PrepareSettings(image_size=args.image_size, resize_mode="square", phantom_seed=1),
            tmp / "shards",
            shard_size=100,
            progress=False,
        )
        tokenizer = build_wordpiece(tmp / "shards", tmp / "vocab")
        paths = full_res_jpegs(tmp, args.full_res)
        results = {
            "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, "
            f"{platform.processor() or 'cpu'}; 1 thread",
            "loader_vs_raw_decode": bench_loader_vs_raw_decode(
                tmp / "shards", tokenizer, args.batch, args.image_size
            ),
            "shardify_vs_full_decode": bench_shardify_image_path(paths),
            "loader_vs_reference_map_dataset": bench_loader_vs_reference(
                paths, tmp / "shards", tokenizer, args.batch
            ),
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
