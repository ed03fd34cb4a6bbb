"""The tower contracts and the factory that picks an image tower from the config."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from prior_dist.models.config import ImageTowerConfig


class ImageFeatures(NamedTuple):
    global_embedding: torch.Tensor   # [B, D]
    patch_tokens: torch.Tensor       # [B, P, D]
    grid: tuple[int, int]            # (h, w), h * w == P


class TextFeatures(NamedTuple):
    token_embeddings: torch.Tensor   # [B, L, D]
    sentences: torch.Tensor          # [B, S, D]
    sentence_mask: torch.Tensor      # [B, S] bool, valid sentences first


def build_image_tower(cfg: ImageTowerConfig, embed_dim: int, token_layout: str) -> nn.Module:
    if cfg.arch == "vit":
        from prior_dist.models.vit import ViTTower

        return ViTTower(cfg, embed_dim)
    from prior_dist.models.resnet import ResNetTower

    return ResNetTower(cfg, embed_dim, token_layout)
