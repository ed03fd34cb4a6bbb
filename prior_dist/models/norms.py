"""Layer norm: NVIDIA apex's fused kernel when it imports and runs on CUDA, native otherwise."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import nn


@functools.cache
def apex_fused_layer_norm():
    """apex's FusedLayerNorm class, or None (PyPI's unrelated `apex` package has no such module)."""
    try:
        module = importlib.import_module("apex.normalization")
        return getattr(module, "FusedLayerNorm", None)
    except Exception:  # noqa: BLE001 - missing or half-built apex both mean: use native
        return None


def layer_norm(dim: int, eps: float = 1e-5) -> nn.Module:
    """A LayerNorm with the state-dict layout of `nn.LayerNorm` (weight, bias) either way."""
    fused = apex_fused_layer_norm()
    if fused is not None and torch.cuda.is_available():
        return fused(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)
