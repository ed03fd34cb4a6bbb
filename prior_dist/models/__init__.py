"""PRIOR model code: single-device modules (no torch.distributed imports; a test enforces it)."""

from prior_dist.models.config import (
    CompatConfig,
    HeadsConfig,
    ImageTowerConfig,
    ModelConfig,
    TextTowerConfig,
    model_config,
)
from prior_dist.models.prior import PriorModel, build_model

__all__ = [
    "CompatConfig",
    "HeadsConfig",
    "ImageTowerConfig",
    "ModelConfig",
    "PriorModel",
    "TextTowerConfig",
    "build_model",
    "model_config",
]
