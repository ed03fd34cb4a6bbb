"""ResNet image tower: torchvision-layout backbone, 1-channel stem, CLIP-style attention pool.

Parameter names match torchvision's ResNet (minus `fc`), so ImageNet state dicts load by name.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock, Bottleneck

from prior_dist.models.config import ImageTowerConfig
from prior_dist.models.features import ImageFeatures, map_to_tokens
from prior_dist.models.pooling import AttentionPool, init_projection
from prior_dist.models.state_dict import resnet_from_torchvision


class ResNetBackbone(nn.Module):
    """conv1/bn1/relu/maxpool and layer1..layer4, for any block, depth and base width."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        width = cfg.width
        self.conv1 = nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        self.layer1 = self._make_layer(block, width, cfg.layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, cfg.layers[3], stride=2)
        self.activation_checkpointing = cfg.activation_checkpointing
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # torchvision's blocks take base_width relative to 64; scale it with our width.
        kwargs = {"base_width": 64} if block is Bottleneck else {}
        layers = [block(self.inplanes, planes, stride, downsample, **kwargs)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_pyramid(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """`{stride: [B, C, H/stride, W/stride]}` for strides 2 (stem), 4, 8, 16 and 32."""
        stem = self.relu(self.bn1(self.conv1(image)))
        out, x = {2: stem}, self.maxpool(stem)
        for stride, stage in zip(
            (4, 8, 16, 32), (self.layer1, self.layer2, self.layer3, self.layer4)
        ):
            x = out[stride] = stage(x)
        return out

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(image))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.activation_checkpointing and self.training:
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x


class ResNetTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig, embed_dim: int, token_layout: str = "spatial"):
        super().__init__()
        self.grid = cfg.grid
        self.token_layout = token_layout
        channels = cfg.feature_channels
        self.backbone = ResNetBackbone(cfg)
        self.attention_pool = AttentionPool(
            channels, cfg.pool_heads, num_positions=self.grid[0] * self.grid[1] + 1
        )
        self.local_proj = nn.Linear(channels, embed_dim)
        self.global_proj = nn.Linear(channels, embed_dim)
        init_projection(self.local_proj)
        init_projection(self.global_proj)
        if cfg.pretrained:
            load_imagenet(self.backbone, cfg.pretrained)

    def feature_pyramid(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.backbone.feature_pyramid(image)

    def forward(self, image: torch.Tensor) -> ImageFeatures:
        feature_map = self.backbone(image)
        if tuple(feature_map.shape[-2:]) != self.grid:
            raise ValueError(
                f"image tower built for {self.grid} feature grid (image.image_size), "
                f"got {tuple(feature_map.shape[-2:])} from input {tuple(image.shape)}"
            )
        pooled = self.attention_pool(rearrange(feature_map, "b c h w -> b (h w) c"))
        tokens = map_to_tokens(feature_map, self.token_layout)
        return ImageFeatures(
            global_embedding=self.global_proj(pooled),
            patch_tokens=self.local_proj(tokens),
            grid=self.grid,
        )


def load_imagenet(backbone: ResNetBackbone, path: str) -> None:
    """Load a torchvision-layout state dict; RGB conv1 is summed over colour to one channel."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict ({type(state).__name__})")
    state = resnet_from_torchvision(state)
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: ImageNet weights do not fit the ResNet tower: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
