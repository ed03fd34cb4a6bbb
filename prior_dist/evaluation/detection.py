"""Object detection on the image tower: torchvision's Faster R-CNN or RetinaNet over an FPN built
on the tower's feature pyramid (strides 4..32, plus a max-pooled level).

Images go in already normalised and at the model's input size, so the detector's own transform
neither resizes nor renormalises. Anchor sizes scale with the input size (8..128 px at 128 px,
as 32..512 would be at 512). The encoder is frozen by default, as for segmentation.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from prior_dist.evaluation.detection_metrics import mean_average_precision
from prior_dist.evaluation.segmentation import Pyramid
from prior_dist.evaluation.tensors import TensorSet, batches, fraction_grid, normalise

Detector = Literal["faster_rcnn", "retinanet"]
LEVELS = (4, 8, 16, 32)


class FPNBackbone(nn.Module):
    """An FPN over the tower's strides 4..32; its width is the tower's widest map, kept
    within 64..256."""

    def __init__(self, tower: nn.Module, image_size: int, frozen: bool):
        super().__init__()
        self.pyramid = Pyramid(tower, image_size, LEVELS, frozen=frozen)
        self.out_channels = min(256, max(64, max(self.pyramid.channels.values())))
        self.fpn = FeaturePyramidNetwork(
            [self.pyramid.channels[s] for s in LEVELS],
            self.out_channels,
            extra_blocks=LastLevelMaxPool(),
        )

    def forward(self, images: torch.Tensor) -> OrderedDict:
        maps = self.pyramid(images)
        return self.fpn(OrderedDict((str(i), maps[s]) for i, s in enumerate(LEVELS)))


def build_detector(
    tower: nn.Module,
    image_size: int,
    num_classes: int,
    detector: Detector = "faster_rcnn",
    finetune: bool = False,
) -> nn.Module:
    """`num_classes` foreground classes; labels given to and returned by it are 1-based."""
    backbone = FPNBackbone(copy.deepcopy(tower), image_size, frozen=not finetune)
    fpn_channels = backbone.out_channels
    scale = image_size / 128
    sizes = tuple((round(8 * scale * 2**i),) for i in range(5))
    common = {
        "min_size": image_size,
        "max_size": image_size,
        "image_mean": [0.0],
        "image_std": [1.0],
    }
    if detector == "faster_rcnn":
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
        representation = 1024 if fpn_channels >= 256 else 256
        return FasterRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
            box_head=TwoMLPHead(fpn_channels * 49, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes + 1),
            # Fewer proposals than torchvision's 2000/1000, for small images
            # and CPUs (bench/dense_heads.py has the step times).
            rpn_pre_nms_top_n_train=1000,
            rpn_post_nms_top_n_train=500,
            rpn_pre_nms_top_n_test=500,
            rpn_post_nms_top_n_test=300,
            box_batch_size_per_image=256,
            **common,
        )
    if detector == "retinanet":
        anchors = AnchorGenerator(
            tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for (s,) in sizes),
            ((0.5, 1.0, 2.0),) * 5,
        )
        return RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, **common)
    raise ValueError(f"detector {detector!r}: choose faster_rcnn or retinanet")


def _targets(data: TensorSet, batch: torch.Tensor, device: torch.device) -> list[dict]:
    return [
        {"boxes": data.boxes[i].to(device), "labels": (data.box_labels[i] + 1).to(device)}
        for i in batch.tolist()
    ]


def train_detector(
    tower: nn.Module,
    image_size: int,
    train: TensorSet,
    num_classes: int,
    indices: torch.Tensor,
    seed: int,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 3e-4,
    detector: Detector = "faster_rcnn",
    finetune: bool = False,
) -> nn.Module:
    torch.manual_seed(seed)
    device = next(tower.parameters()).device  # the fine-tune runs where the tower is
    model = build_detector(tower, image_size, num_classes, detector, finetune).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for batch in batches(indices, min(batch_size, len(indices)), steps, seed):
        images = list(normalise(train.images[batch]).to(device))
        losses = model(images, _targets(train, batch, device))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
    return model


@torch.no_grad()
def predict_boxes(model: nn.Module, data: TensorSet, batch_size: int = 16) -> list[dict]:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(data), batch_size):
        for p in model(list(data.normalised(slice(start, start + batch_size)).to(device))):
            p = {k: v.cpu() for k, v in p.items()}
            out.append({"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"] - 1})
    return out


def detection_task(
    tower: nn.Module,
    image_size: int,
    train: TensorSet,
    test: TensorSet,
    classes,
    fractions=(0.01, 0.1, 1.0),
    seeds=(0, 1, 2),
    steps: int = 300,
    detector: Detector = "faster_rcnn",
    finetune: bool = False,
) -> dict:
    out = {
        "classes": list(classes),
        "detector": detector,
        "train_images": len(train),
        "test_images": len(test),
        "steps": steps,
        "finetune": finetune,
        "test_boxes": int(sum(len(b) for b in test.boxes)),
    }
    truth = [{"boxes": b, "labels": c} for b, c in zip(test.boxes, test.box_labels)]

    def run(indices, seed):
        model = train_detector(
            tower,
            image_size,
            train,
            len(classes),
            indices,
            seed,
            steps,
            detector=detector,
            finetune=finetune,
        )
        return mean_average_precision(predict_boxes(model, test), truth, len(classes))

    out.update(fraction_grid(len(train), fractions, seeds, run, ("map", "map_50")))
    return out
