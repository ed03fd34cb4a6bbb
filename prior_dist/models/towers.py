"""The image-tower registry: `image.arch` -> the class that builds it.

A new tower (a timm ConvNeXt, say) is one module that returns `ImageFeatures` and offers
`feature_pyramid`, plus one line here.
"""

from __future__ import annotations

from torch import nn

from prior_dist.models.config import ImageTowerConfig
from prior_dist.models.resnet import ResNetTower
from prior_dist.models.vit import ViTTower


def build_image_tower(cfg: ImageTowerConfig, embed_dim: int, token_layout: str) -> nn.Module:
    if cfg.arch == "vit":
        return ViTTower(cfg, embed_dim)
    return ResNetTower(cfg, embed_dim, token_layout)
