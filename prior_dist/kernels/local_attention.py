"""Host side of the Triton local-attention kernels: capability, tiling, launches, autograd.

`triton_local_attention(q, k, v, query_mask, key_mask, scale, activation)` is differentiable
in q, k and v. `launch_forward` / `launch_backward` take optional preallocated outputs so tests
can poison them and catch elements a kernel fails to write.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_IMPORTED: dict[str, object] = {}


def _triton_modules():
    """The kernels module, or None when Triton does not import. Cached in a plain dict (which
    torch.compile reads as a constant once filled; see `models.attention.flash_attn_module`)."""
    if "kernels" not in _IMPORTED:
        try:
            importlib.import_module("triton")
            kernels = importlib.import_module("prior_dist.kernels.triton_local_attention")
        except Exception:  # noqa: BLE001 - a broken Triton install must mean "not available"
            kernels = None
        _IMPORTED["kernels"] = kernels
    return _IMPORTED["kernels"]


def triton_available() -> bool:
    return _triton_modules() is not None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot run these tensors here, or None when it can."""
    if _triton_modules() is None:
        return "Triton does not import"
    if q.device.type != "cuda" and not interpreter_on():
        return (
            f"tensors are on {q.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 set "
            "before triton is imported)"
        )
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return "expects [B, S, D] query and [B, P, D] key/value"
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
        return "batch or key/value lengths differ"
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        return "query, key and value widths differ"
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {q.dtype} (needs one of fp32, bf16, fp16 for all three)"
    if min(q.shape[1], k.shape[1], q.shape[2]) < 1:
        return "empty dimension"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Tiling:
    bq: int
    bk: int
    bd: int
    bt: int
    num_warps: int


def choose_tiling(sq: int, sk: int, d: int, device_type: str) -> Tiling:
    """Block sizes (powers of two, at least 16 for tl.dot); small on the interpreter."""
    clamp = lambda n, hi: max(16, min(_next_pow2(n), hi))  # noqa: E731
    if device_type != "cuda":
        return Tiling(clamp(sq, 32), clamp(sk, 32), clamp(d, 32), clamp(d, 32), 4)
    # The output tile (bt) bounds the recompute of QKᵀ (D / bt times) against register use.
    bt = clamp(d, 256)
    return Tiling(
        clamp(sq, 64 if bt <= 128 else 32), clamp(sk, 64), clamp(d, 64), bt, 8 if bt >= 256 else 4
    )


def _precision(dtype: torch.dtype) -> dict:
    """tl.dot settings: fp32 inputs multiply in full precision (no TF32) so fp32 results match
    the reference; half-precision operands multiply natively (the precision setting only
    governs fp32 operands; Triton 3.6 on CUDA refuses any value but tf32, tf32x3, ieee, bf16x3
    and bf16x6); bf16 operands are widened exactly under the interpreter (see `_dot`)."""
    return {
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": interpreter_on() and dtype == torch.bfloat16,
    }


def _mask(mask: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, n, dtype=torch.int8, device=device)
    if tuple(mask.shape) != (batch, n):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match ({batch}, {n})")
    return mask.to(device=device, dtype=torch.int8).contiguous()


class _Launch(NamedTuple):
    batch: int
    sq: int
    sk: int
    d: int
    qm: torch.Tensor
    km: torch.Tensor
    softmax: bool
    tiles: Tiling
    precision: dict


def _launch_setup(q, k, query_mask, key_mask, activation: str) -> _Launch:
    """Shapes, int8 masks, tiling and dot settings shared by the forward and backward launch."""
    batch, sq, d = q.shape
    sk = k.shape[1]
    return _Launch(
        batch,
        sq,
        sk,
        d,
        _mask(query_mask, batch, sq, q.device),
        _mask(key_mask, batch, sk, q.device),
        activation == "softmax",
        choose_tiling(sq, sk, d, q.device.type),
        _precision(q.dtype),
    )


def launch_forward(
    q,
    k,
    v,
    query_mask,
    key_mask,
    scale: float,
    activation: str,
    store_attention: bool = False,
    out=None,
    attention=None,
):
    """(out [B, Sq, D], lse [B, Sq] or None, attention [B, Sq, Sk] or None)."""
    kernels = _triton_modules()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, sq, sk, d, qm, km, softmax, tiles, precision = _launch_setup(
        q, k, query_mask, key_mask, activation
    )
    lse = torch.empty(batch, sq, device=q.device, dtype=torch.float32) if softmax else None
    if softmax:
        kernels._softmax_stats_kernel[(triton_cdiv(sq, tiles.bq), batch)](
            q,
            k,
            qm,
            km,
            lse,
            sq,
            sk,
            d,
            scale,
            BQ=tiles.bq,
            BK=tiles.bk,
            BD=tiles.bd,
            num_warps=tiles.num_warps,
            **precision,
        )
    out = torch.empty_like(q) if out is None else out
    if store_attention and attention is None:
        attention = torch.empty(batch, sq, sk, device=q.device, dtype=q.dtype)
    grid = (triton_cdiv(sq, tiles.bq), batch, triton_cdiv(d, tiles.bt))
    kernels._forward_kernel[grid](
        q,
        k,
        v,
        qm,
        km,
        lse if softmax else out,
        out,
        attention if store_attention else out,
        sq,
        sk,
        d,
        scale,
        SOFTMAX=softmax,
        STORE_ATTN=store_attention,
        BQ=tiles.bq,
        BK=tiles.bk,
        BD=tiles.bd,
        BT=tiles.bt,
        num_warps=tiles.num_warps,
        **precision,
    )
    return out, lse, attention if store_attention else None


def launch_backward(
    q,
    k,
    v,
    out,
    grad_out,
    query_mask,
    key_mask,
    lse,
    scale: float,
    activation: str,
    dq=None,
    dk=None,
    dv=None,
):
    """(dq, dk, dv) for `grad_out`; `out` and `lse` come from `launch_forward`."""
    kernels = _triton_modules()
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    batch, sq, sk, d, qm, km, softmax, tiles, precision = _launch_setup(
        q, k, query_mask, key_mask, activation
    )
    # Softmax backward needs rowsum(dO * O) per query: cheap, [B, Sq].
    delta = (grad_out.float() * out.float()).sum(-1).contiguous() if softmax else None
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    placeholder = dq
    common = dict(
        SOFTMAX=softmax,
        BQ=tiles.bq,
        BK=tiles.bk,
        BD=tiles.bd,
        BT=tiles.bt,
        num_warps=tiles.num_warps,
        **precision,
    )
    kernels._backward_dq_kernel[(triton_cdiv(sq, tiles.bq), batch, triton_cdiv(d, tiles.bt))](
        q,
        k,
        v,
        grad_out,
        qm,
        km,
        lse if softmax else placeholder,
        delta if softmax else placeholder,
        dq,
        sq,
        sk,
        d,
        scale,
        **common,
    )
    kernels._backward_dkdv_kernel[(triton_cdiv(sk, tiles.bk), batch, triton_cdiv(d, tiles.bt))](
        q,
        k,
        v,
        grad_out,
        qm,
        km,
        lse if softmax else placeholder,
        delta if softmax else placeholder,
        dk,
        dv,
        sq,
        sk,
        d,
        scale,
        **common,
    )
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, query_mask, key_mask, scale, activation):
        out, lse, _ = launch_forward(q, k, v, query_mask, key_mask, scale, activation)
        empty = q.new_empty(0)
        ctx.save_for_backward(
            q,
            k,
            v,
            out,
            query_mask if query_mask is not None else empty,
            key_mask if key_mask is not None else empty,
            lse if lse is not None else empty,
        )
        ctx.has_masks = (query_mask is not None, key_mask is not None)
        ctx.scale, ctx.activation = scale, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, qm, km, lse = ctx.saved_tensors
        qm = qm if ctx.has_masks[0] else None
        km = km if ctx.has_masks[1] else None
        lse = lse if ctx.activation == "softmax" else None
        dq, dk, dv = launch_backward(q, k, v, out, grad_out, qm, km, lse, ctx.scale, ctx.activation)
        return dq, dk, dv, None, None, None, None


def triton_local_attention(
    q,
    k,
    v,
    query_mask=None,
    key_mask=None,
    *,
    scale: float,
    activation: str = "sigmoid",
    return_attention: bool = False,
):
    """Fused local attention; the attention maps (when asked for) carry no gradient."""
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
    if return_attention:
        with torch.no_grad():
            out, _, attention = launch_forward(
                q, k, v, query_mask, key_mask, scale, activation, store_attention=True
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            out = _LocalAttention.apply(q, k, v, query_mask, key_mask, scale, activation)
        return out, attention
    return _LocalAttention.apply(q, k, v, query_mask, key_mask, scale, activation)
