"""Batched masked cross-attention of local alignment (spec section 3), with dispatch.

`local_attention(query [B, Sq, D], key [B, Sk, D], value [B, Sk, D], ...)` computes
`A = act(Q Kᵀ · scale)` with masked keys contributing exactly zero and masked query rows
output zero, then `out = A V`. `activation="sigmoid"` is PRIOR's (rows need not sum to one);
`"softmax"` is the word-level (GLoRIA-style) variant. The pure PyTorch reference below is the
ground truth that fused kernels are tested against.
"""

from __future__ import annotations

from typing import Literal

import torch

Activation = Literal["sigmoid", "softmax"]


def local_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              query_mask: torch.Tensor | None, key_mask: torch.Tensor | None,
                              scale: float, activation: Activation = "sigmoid",
                              return_attention: bool = False):
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


def resolve_local_attention_impl(impl: str, device: torch.device) -> str:
    """'torch' (no fused kernel is built yet) for 'auto' | 'torch'; an explicit 'triton' raises."""
    if impl == "torch" or impl == "auto":
        return "torch"
    if impl == "triton":
        raise RuntimeError("local_attention_impl='triton' requested but no Triton kernel is "
                           "available in this build; use 'auto' or 'torch'")
    raise ValueError("local_attention_impl must be one of ['auto', 'triton', 'torch'], "
                     f"got {impl!r}")


def local_attention(query, key, value, query_mask=None, key_mask=None, *, scale: float,
                    activation: Activation = "sigmoid", return_attention: bool = False,
                    impl: str = "auto"):
    """Dispatching entry point used by the model (see module docstring)."""
    resolve_local_attention_impl(impl, query.device)
    return local_attention_reference(query, key, value, query_mask, key_mask, scale, activation,
                                     return_attention)
