"""Semantic segmentation on the image tower: a U-Net-style decoder over its feature pyramid.

The decoder climbs from the coarsest map to full resolution, at each stride fusing the
encoder's map of that stride (skip connection) when there is one: a ResNet gives strides
2..32, a ViT one map that `Pyramid` turns into strides 4..32 first. The encoder is frozen by
default (it measures the representation); `finetune=True` trains it too, at a tenth of the
decoder's learning rate. Loss: BCE + soft Dice per class (classes may overlap). Metrics per
class over the test split: Dice and IoU of all pixels together, and the mean per-image Dice over
images whose ground truth is not empty.
"""

from __future__ import annotations

import copy
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from prior_dist.evaluation.tensors import TensorSet, batches, fraction_grid, normalise

# Legend: B batch, C channels, H/W map size, M mask classes.


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Pyramid(nn.Module):
    """The tower's `feature_pyramid`, completed to every stride in `strides` with learned
    up-/down-sampling from the nearest map it has (the ViTDet simple pyramid for a ViT).
    A frozen tower runs without gradients and with its pretrained BN statistics."""

    def __init__(
        self, tower: nn.Module, image_size: int, strides=(4, 8, 16, 32), frozen: bool = True
    ):
        super().__init__()
        self.tower, self.frozen = tower, frozen
        for p in tower.parameters():
            p.requires_grad_(not frozen)
        device = next(tower.parameters()).device  # the probe runs where the tower is
        with torch.no_grad():
            was = tower.training
            have = {
                s: m.shape[1]
                for s, m in tower.eval()
                .feature_pyramid(torch.zeros(1, 1, image_size, image_size, device=device))
                .items()
            }
            tower.train(was)
        self.make = nn.ModuleDict()
        self.sources: dict[int, int] = {}
        for stride in strides:
            if stride in have:
                continue
            source = min(have, key=lambda s: abs(math.log2(s / stride)))
            channels = have[source]
            if source > stride:
                layer = nn.ConvTranspose2d(
                    channels, channels, source // stride, stride=source // stride
                )
            else:
                layer = nn.MaxPool2d(stride // source, stride // source)
            self.make[str(stride)] = layer
            self.sources[stride] = source
        self.channels = {**have, **{s: have[src] for s, src in self.sources.items()}}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            maps = dict(self.tower.feature_pyramid(image))
        for stride, source in self.sources.items():
            maps[stride] = self.make[str(stride)](maps[source])
        return maps


class UNetDecoder(nn.Module):
    def __init__(self, channels: dict[int, int], num_classes: int, widths=(256, 128, 64, 32, 16)):
        super().__init__()
        strides = sorted(channels, reverse=True)  # 32, 16, ..., coarsest first
        self.top = strides[0]
        ladder = [self.top // 2**i for i in range(1, int(math.log2(self.top)) + 1)]
        widths = list(widths) + [widths[-1]] * max(0, len(ladder) - len(widths))
        self.blocks = nn.ModuleDict()
        cin = channels[self.top]
        for stride, width in zip(ladder, widths):
            skip = channels.get(stride, 0)
            self.blocks[str(stride)] = _conv_block(cin + skip, width)
            cin = width
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, maps: dict[int, torch.Tensor]) -> torch.Tensor:
        x = maps[self.top]
        for key, block in self.blocks.items():
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            skip = maps.get(int(key))
            x = block(torch.cat([x, skip], 1) if skip is not None else x)
        return self.head(x)


class SegmentationModel(nn.Module):
    def __init__(self, tower: nn.Module, image_size: int, num_classes: int, finetune: bool = False):
        super().__init__()
        self.pyramid = Pyramid(tower, image_size, frozen=not finetune)
        self.decoder = UNetDecoder(self.pyramid.channels, num_classes)

    def forward(self, image_B1HW: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.pyramid(image_B1HW))


def segmentation_loss(logits_BMHW: torch.Tensor, target_BMHW: torch.Tensor) -> torch.Tensor:
    target = target_BMHW.float()
    bce = F.binary_cross_entropy_with_logits(logits_BMHW, target)
    prob = logits_BMHW.sigmoid()
    inter = (prob * target).sum((0, 2, 3))
    dice = (2 * inter + 1) / (prob.sum((0, 2, 3)) + target.sum((0, 2, 3)) + 1)
    return bce + (1 - dice).mean()


def dice_iou(pred_NMHW: torch.Tensor, target_NMHW: torch.Tensor, classes) -> dict:
    """Per class: pooled Dice and IoU over all pixels, and mean Dice over positive images."""
    pred, target = pred_NMHW.bool(), target_NMHW.bool()
    out = {}
    for m, name in enumerate(classes):
        p, t = pred[:, m], target[:, m]
        inter = (p & t).sum().item()
        union = (p | t).sum().item()
        total = p.sum().item() + t.sum().item()
        positive = t.flatten(1).any(1)
        per_image = [
            (2 * (p[i] & t[i]).sum().item()) / max(1, p[i].sum().item() + t[i].sum().item())
            for i in torch.nonzero(positive).flatten().tolist()
        ]
        out[name] = {
            "dice": 2 * inter / total if total else float("nan"),
            "iou": inter / union if union else float("nan"),
            "image_dice": statistics.mean(per_image) if per_image else float("nan"),
            "positive_images": len(per_image),
        }
    valid = [v["dice"] for v in out.values() if v["dice"] == v["dice"]]
    ious = [v["iou"] for v in out.values() if v["iou"] == v["iou"]]
    return {
        "mean_dice": statistics.mean(valid) if valid else float("nan"),
        "mean_iou": statistics.mean(ious) if ious else float("nan"),
        "per_class": out,
    }


@torch.no_grad()
def predict_masks(model: SegmentationModel, data: TensorSet, batch_size: int = 32):
    model.eval()
    device = next(model.parameters()).device
    parts = [
        (model(data.normalised(slice(i, i + batch_size)).to(device)) > 0).cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(parts)


def train_segmentation(
    tower: nn.Module,
    image_size: int,
    train: TensorSet,
    classes,
    indices: torch.Tensor,
    seed: int,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    finetune: bool = False,
) -> SegmentationModel:
    torch.manual_seed(seed)
    device = next(tower.parameters()).device  # the fine-tune runs where the tower is
    model = SegmentationModel(copy.deepcopy(tower), image_size, len(classes), finetune)
    model.to(device)
    decoder_params = [p for n, p in model.named_parameters() if not n.startswith("pyramid.tower")]
    groups = [{"params": decoder_params, "lr": lr}]
    if finetune:
        groups.append({"params": list(model.pyramid.tower.parameters()), "lr": lr / 10})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, [g["lr"] for g in groups], total_steps=steps, pct_start=0.1
    )
    model.train()
    for batch in batches(indices, min(batch_size, len(indices)), steps, seed):
        images = normalise(train.images[batch]).to(device)
        loss = segmentation_loss(model(images), train.masks[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


def segmentation_task(
    tower: nn.Module,
    image_size: int,
    train: TensorSet,
    test: TensorSet,
    classes,
    fractions=(0.01, 0.1, 1.0),
    seeds=(0, 1, 2),
    steps: int = 200,
    finetune: bool = False,
) -> dict:
    out = {
        "classes": list(classes),
        "train_images": len(train),
        "test_images": len(test),
        "steps": steps,
        "finetune": finetune,
    }

    def run(indices, seed):
        model = train_segmentation(
            tower, image_size, train, classes, indices, seed, steps, finetune=finetune
        )
        return dice_iou(predict_masks(model, test), test.masks, classes)

    out.update(fraction_grid(len(train), fractions, seeds, run, ("mean_dice", "mean_iou")))
    return out
