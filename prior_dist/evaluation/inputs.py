"""What every evaluation task reads: downstream splits, report batches, image batches, and the
random-init baseline."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from prior_dist.data.config import DataConfig
from prior_dist.data.loader import PriorLoader
from prior_dist.data.tokenize import MAX_TOKENS
from prior_dist.evaluation.datasets import DownstreamSet, open_dataset
from prior_dist.evaluation.tensors import normalise, resized_chunks
from prior_dist.models import build_model
from prior_dist.runs import LoadedModel


@dataclass(frozen=True)
class DataOptions:
    """How to read a downstream `KIND:PATH`: a committed split file, CheXpert's -1 policy."""

    split_file: str | None = None
    uncertain: str = "ignore"

    def adapter_options(self, data: str) -> dict:
        """The options that apply to `data`'s adapter."""
        return {"uncertain": self.uncertain} if data.startswith("chexpert:") else {}


def open_split(data: str, split: str, options: DataOptions | None = None) -> DownstreamSet:
    """One split of a shard directory or a `KIND:PATH` public layout."""
    options = options or DataOptions()
    return open_dataset(data, split, options.split_file, **options.adapter_options(data))


def report_loader(
    loaded: LoadedModel, data: str, split: str, labels, batch_size: int = 64
) -> PriorLoader:
    """Image-report batches of a shard split in order, without augmentation."""
    cfg = loaded.model.cfg
    data_cfg = DataConfig(max_tokens=min(MAX_TOKENS, cfg.text.max_position_embeddings))
    transform = data_cfg.transform(cfg.image.image_size, train=False)
    return PriorLoader(
        data,
        loaded.tokenizer,
        batch_size,
        split=split,
        rank=0,
        world_size=1,
        shuffle=False,
        label_names=list(labels),
        transform=transform,
        pin_memory=next(loaded.model.parameters()).is_cuda,
    )


def image_batches(loaded, dataset, batch_size: int = 64):
    """(normalised images [B, 1, S, S], labels [B, C]) over a downstream split, streamed."""
    skipped = 0
    for good, errors in resized_chunks(
        dataset, loaded.model.cfg.image.image_size, batch_size=batch_size
    ):
        skipped += len(errors)
        if good:
            yield (
                normalise(torch.stack([c["image"] for c in good])),
                torch.stack([c["labels"] for c in good]),
            )
    if skipped:
        print(f"evaluate: {dataset.name} [{dataset.split}]: skipped {skipped} unreadable images")


def random_init_like(loaded):
    """The same configuration with random weights (the baseline every task reports), on the
    same device."""
    torch.manual_seed(0)
    device = next(loaded.model.parameters()).device
    model = build_model(loaded.model.cfg).to(device).eval()
    return LoadedModel(model, loaded.tokenizer, "random-init", {})


def resolve_device(spec: str) -> torch.device:
    """`--device`: `auto` (the first CUDA device when there is one, else the CPU), `cpu`,
    `cuda` or `cuda:N`; a CUDA device this machine does not have is refused by name."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N ({err})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {spec}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return device


def inference_precision(device: torch.device):
    """The autocast context for evaluation: bf16 on a CUDA device that has it, fp16 on an
    older one, none (fp32) on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
