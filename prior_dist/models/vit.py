"""ViT image tower (pre-norm transformer on 1-channel patches) with fused attention.

Global embedding: the class token; local: the patch tokens, in row-major grid order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from prior_dist.models.attention import attention, resolve_attention_impl
from prior_dist.models.config import ImageTowerConfig
from prior_dist.models.features import ImageFeatures
from prior_dist.models.norms import layer_norm
from prior_dist.models.pooling import init_projection


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = layer_norm(width, 1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = layer_norm(width, 1e-6)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, impl: str) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads
        )
        x = x + self.proj(rearrange(attention(q, k, v, impl=impl), "b h n d -> b n (h d)"))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.grid
        width = cfg.vit_width
        self.patch_embed = nn.Conv2d(1, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1] + 1, width) * 0.02)
        self.blocks = nn.ModuleList(
            ViTBlock(width, cfg.vit_heads, cfg.vit_mlp_ratio) for _ in range(cfg.vit_depth)
        )
        self.norm = layer_norm(width, 1e-6)
        self.local_proj = nn.Linear(width, embed_dim)
        self.global_proj = nn.Linear(width, embed_dim)
        init_projection(self.local_proj)
        init_projection(self.global_proj)

    def feature_pyramid(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """`{patch_size: [B, width, H/p, W/p]}`: the normalised patch tokens as a map (dense
        heads build the other strides from it)."""
        tokens = self._tokens(image)[:, 1:]
        return {self.cfg.patch_size: rearrange(tokens, "b (h w) c -> b c h w", h=self.grid[0])}

    def forward(self, image: torch.Tensor) -> ImageFeatures:
        x = self._tokens(image)
        return ImageFeatures(
            global_embedding=self.global_proj(x[:, 0]),
            patch_tokens=self.local_proj(x[:, 1:]),
            grid=self.grid,
        )

    def _tokens(self, image: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(image)
        if tuple(patches.shape[-2:]) != self.grid:
            raise ValueError(
                f"ViT built for a {self.grid} patch grid (image.image_size), got "
                f"{tuple(patches.shape[-2:])} from input {tuple(image.shape)}"
            )
        x = rearrange(patches, "b c h w -> b (h w) c")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        impl = resolve_attention_impl(self.cfg.attention_impl, x.device)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, impl, use_reentrant=False)
            else:
                x = block(x, impl)
        return self.norm(x)
