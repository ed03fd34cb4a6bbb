"""Fused multi-head attention: flash-attn when installed on CUDA, PyTorch SDPA otherwise.

`resolve_attention_impl` decides once per (setting, device type). `auto` falls back to SDPA with
one warning; an explicit `flash` that cannot run raises. Layouts: padded `[B, H, L, Dh]` for
`attention`, packed `[T, H, Dh]` with cumulative sequence lengths for `varlen_attention`.
"""

from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn.functional as F

_WARNED: set[str] = set()
_FLASH: dict[str, object] = {}


def flash_attn_module():
    """The imported `flash_attn` package, or None when it is not installed or does not import.

    Cached in a plain dict, not `functools.cache`: torch.compile traces a dict lookup as a
    constant, but traces through a cache wrapper into the import (a graph break)."""
    if "module" not in _FLASH:
        try:
            _FLASH["module"] = importlib.import_module("flash_attn")
        except Exception:  # noqa: BLE001 - a broken build (ABI mismatch) must also fall back
            _FLASH["module"] = None
    return _FLASH["module"]


def resolve_attention_impl(impl: str, device: torch.device) -> str:
    """'flash' or 'sdpa' for a setting of 'auto' | 'flash' | 'sdpa' on `device`."""
    if impl == "sdpa":
        return "sdpa"
    usable = device.type == "cuda" and flash_attn_module() is not None
    if impl == "flash":
        if not usable:
            why = (
                "flash-attn is not installed"
                if flash_attn_module() is None
                else f"flash-attn runs on CUDA only, tensors are on {device.type}"
            )
            raise RuntimeError(
                f"attention_impl='flash' requested but {why}; use attention_impl='auto' or 'sdpa'"
            )
        return "flash"
    if impl != "auto":
        raise ValueError(f"attention_impl must be one of ['auto', 'flash', 'sdpa'], got {impl!r}")
    if usable:
        return "flash"
    reason = "not installed" if flash_attn_module() is None else f"not usable on {device.type}"
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"attention_impl='auto': flash-attn {reason}; using PyTorch SDPA", stacklevel=2
        )
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    impl: str,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention on `[B, H, L, Dh]`; `key_mask [B, Lk]` is True where valid."""
    if impl == "flash" and key_mask is None and q.dtype in (torch.float16, torch.bfloat16):
        flash = flash_attn_module()
        out = flash.flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            causal=causal,
        )
        return out.transpose(1, 2)
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :].to(torch.bool)
        if causal:
            lq, lk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
            causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
    )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Padding-free attention over packed sequences `[T, H, Dh]` (flash-attn only)."""
    flash = flash_attn_module()
    return flash.flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout_p
    )
