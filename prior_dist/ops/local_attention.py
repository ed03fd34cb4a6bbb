"""Batched masked cross-attention of local alignment (spec section 3), with dispatch.

`local_attention(query [B, Sq, D], key [B, Sk, D], value [B, Sk, D], ...)` computes
`A = act(Q Kᵀ · scale)` with masked keys contributing exactly zero and masked query rows
output zero, then `out = A V`. `activation="sigmoid"` is PRIOR's (rows need not sum to one);
`"softmax"` is the word-level (GLoRIA-style) variant. The pure PyTorch reference below is the
ground truth that fused kernels are tested against; `prior_dist.kernels` holds the Triton
kernel that `impl="triton"` (or `auto` on CUDA) runs instead.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from prior_dist.kernels import local_attention as kernel

Activation = Literal["sigmoid", "softmax"]


def local_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
    activation: Activation = "sigmoid",
    return_attention: bool = False,
):
    """Eager batched implementation; returns `out` or `(out, attention [B, Sq, Sk])`."""
    scores = torch.einsum("bqd,bkd->bqk", query, key) * scale
    if activation == "sigmoid":
        weights = torch.sigmoid(scores)
        if key_mask is not None:
            weights = weights * key_mask[:, None, :].to(weights.dtype)
    elif activation == "softmax":
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        # A row whose keys are all masked gives NaN from softmax; it attends to nothing.
        weights = torch.nan_to_num(weights, nan=0.0)
    else:
        raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
    if query_mask is not None:
        weights = weights * query_mask[:, :, None].to(weights.dtype)
    out = torch.einsum("bqk,bkd->bqd", weights, value)
    return (out, weights) if return_attention else out


_WARNED: set[str] = set()
_AUTO_FAILED: list[str] = []


def resolve_local_attention_impl(
    impl: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> str:
    """'triton' or 'torch' for a setting of 'auto' | 'triton' | 'torch'.

    `auto` takes the Triton kernel on CUDA when Triton imports and the shapes are supported,
    otherwise the reference (with one warning on CUDA; on the CPU the reference is the path).
    An explicit `triton` that cannot run raises, naming the reason.
    """
    if impl == "torch":
        return "torch"
    if impl not in ("auto", "triton"):
        raise ValueError(
            f"local_attention_impl must be one of ['auto', 'triton', 'torch'], got {impl!r}"
        )
    reason = kernel.unsupported_reason(query, key, value)
    if impl == "triton":
        if reason is not None:
            raise RuntimeError(
                f"local_attention_impl='triton' cannot run: {reason}; use 'auto' or 'torch'"
            )
        return "triton"
    if query.device.type != "cuda":
        return "torch"
    if reason is not None:
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(
                f"local_attention_impl='auto': Triton kernel not used ({reason}); "
                "using the PyTorch reference",
                stacklevel=3,
            )
        return "torch"
    return "triton"


def local_attention(
    query,
    key,
    value,
    query_mask=None,
    key_mask=None,
    *,
    scale: float,
    activation: Activation = "sigmoid",
    return_attention: bool = False,
    impl: str = "auto",
):
    """Dispatching entry point used by the model (see module docstring).

    On the Triton path the attention maps carry no gradient; `auto` keeps the reference when
    maps are asked for while gradients are being recorded, so they stay differentiable.
    """
    chosen = resolve_local_attention_impl(impl, query, key, value)
    if (
        chosen == "triton"
        and impl == "auto"
        and return_attention
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (query, key, value))
    ):
        chosen = "torch"
    if chosen == "triton" and impl == "auto" and _AUTO_FAILED:
        chosen = "torch"
    if chosen == "triton":
        try:
            return kernel.triton_local_attention(
                query,
                key,
                value,
                query_mask,
                key_mask,
                scale=scale,
                activation=activation,
                return_attention=return_attention,
            )
        except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch
            if impl != "auto":
                raise
            # `auto` must not break a training run over an optional kernel: fall back for the
            # rest of the process, once, loudly.
            _AUTO_FAILED.append(repr(err))
            warnings.warn(
                f"local_attention_impl='auto': the Triton kernel failed ({err!r}); "
                "using the PyTorch reference from now on",
                stacklevel=2,
            )
    return local_attention_reference(
        query, key, value, query_mask, key_mask, scale, activation, return_attention
    )
