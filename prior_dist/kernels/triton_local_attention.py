"""Triton kernels for the batched masked cross-attention of local alignment.

`out[b] = act(Q[b] K[b]ᵀ · scale) V[b]` for queries `[B, Sq, D]` and keys/values `[B, Sk, D]`,
with masked keys contributing zero and masked query rows giving zero. `act` is `sigmoid`
(PRIOR) or `softmax` (word-level). The `[B, Sq, Sk]` attention never sits in global memory:
each program recomputes its score tile from Q and K (tiled over D) and consumes it at once.
Softmax uses a first pass that keeps a running max and sum per row (online softmax) and stores
only the row log-sum-exp `[B, Sq]`.

Grids: forward and dQ run over (query blocks, batch, D tiles); dK/dV over (key blocks, batch,
D tiles). All accumulation is fp32; inputs may be fp32, bf16 or fp16.

Legend: BQ query rows per block, BK key rows per block, BD the D chunk of the score loop,
BT the D tile a program owns for its output.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32-accumulating product. UPCAST widens the operands first (exact for bf16): the
    Triton interpreter mis-computes tl.dot on bf16 operands, so it is used there only."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(
    q_ptr,
    k_ptr,
    b,
    q_offs,
    k_offs,
    Sq,
    Sk,
    D,
    stride_b_q,
    stride_b_k,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Raw scores `Q[b, q_offs] · K[b, k_offs]ᵀ`, fp32 `[BQ, BK]`."""
    acc = tl.zeros((BQ, BK), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        q = tl.load(
            q_ptr + b * stride_b_q + q_offs[:, None] * D + d[None, :],
            mask=(q_offs[:, None] < Sq) & (d[None, :] < D),
            other=0.0,
        )
        k = tl.load(
            k_ptr + b * stride_b_k + k_offs[:, None] * D + d[None, :],
            mask=(k_offs[:, None] < Sk) & (d[None, :] < D),
            other=0.0,
        )
        acc += _dot(q, tl.trans(k), PRECISION, UPCAST)
    return acc


@triton.jit
def _activate(s, scale, lse, q_valid, k_valid, SOFTMAX: tl.constexpr):
    """Attention weights of a score tile; zero wherever the query or the key is masked."""
    s = s * scale
    if SOFTMAX:
        live = lse > float("-inf")
        safe = tl.where(live, lse, 0.0)
        a = tl.exp(s - safe[:, None])
        a = tl.where(live[:, None], a, 0.0)
    else:
        a = tl.sigmoid(s)
    keep = q_valid[:, None] & k_valid[None, :]
    return tl.where(keep, a, 0.0)


@triton.jit
def _valid(mask_ptr, b, offs, n):
    inside = offs < n
    m = tl.load(mask_ptr + b * n + offs, mask=inside, other=0)
    return inside & (m != 0)


@triton.jit
def _softmax_stats_kernel(
    q_ptr,
    k_ptr,
    qmask_ptr,
    kmask_ptr,
    lse_ptr,
    Sq,
    Sk,
    D,
    scale,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_q = tl.program_id(0)
    b = tl.program_id(1)
    q_offs = pid_q * BQ + tl.arange(0, BQ)
    q_valid = _valid(qmask_ptr, b, q_offs, Sq)
    m = tl.full((BQ,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BQ,), dtype=tl.float32)
    for k0 in range(0, Sk, BK):
        k_offs = k0 + tl.arange(0, BK)
        k_valid = _valid(kmask_ptr, b, k_offs, Sk)
        s = (
            _scores(
                q_ptr,
                k_ptr,
                b,
                q_offs,
                k_offs,
                Sq,
                Sk,
                D,
                Sq * D,
                Sk * D,
                BQ,
                BK,
                BD,
                PRECISION,
                UPCAST,
            )
            * scale
        )
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.where(k_valid[None, :], tl.exp(s - m_safe[:, None]), 0.0)
        total = total * tl.exp(m - m_safe) + tl.sum(p, axis=1)
        m = m_new
    lse = tl.where(
        q_valid & (total > 0), m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")
    )
    tl.store(lse_ptr + b * Sq + q_offs, lse, mask=q_offs < Sq)


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qmask_ptr,
    kmask_ptr,
    lse_ptr,
    out_ptr,
    attn_ptr,
    Sq,
    Sk,
    D,
    scale,
    SOFTMAX: tl.constexpr,
    STORE_ATTN: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_q = tl.program_id(0)
    b = tl.program_id(1)
    pid_t = tl.program_id(2)
    q_offs = pid_q * BQ + tl.arange(0, BQ)
    t = pid_t * BT + tl.arange(0, BT)
    q_valid = _valid(qmask_ptr, b, q_offs, Sq)
    lse = tl.zeros((BQ,), dtype=tl.float32)
    if SOFTMAX:
        lse = tl.load(lse_ptr + b * Sq + q_offs, mask=q_offs < Sq, other=float("-inf"))
    acc = tl.zeros((BQ, BT), dtype=tl.float32)
    for k0 in range(0, Sk, BK):
        k_offs = k0 + tl.arange(0, BK)
        k_valid = _valid(kmask_ptr, b, k_offs, Sk)
        s = _scores(
            q_ptr,
            k_ptr,
            b,
            q_offs,
            k_offs,
            Sq,
            Sk,
            D,
            Sq * D,
            Sk * D,
            BQ,
            BK,
            BD,
            PRECISION,
            UPCAST,
        )
        a = _activate(s, scale, lse, q_valid, k_valid, SOFTMAX)
        v = tl.load(
            v_ptr + b * Sk * D + k_offs[:, None] * D + t[None, :],
            mask=(k_offs[:, None] < Sk) & (t[None, :] < D),
            other=0.0,
        )
        acc += _dot(a.to(v.dtype), v, PRECISION, UPCAST)
        if STORE_ATTN:
            if pid_t == 0:
                tl.store(
                    attn_ptr + b * Sq * Sk + q_offs[:, None] * Sk + k_offs[None, :],
                    a.to(attn_ptr.dtype.element_ty),
                    mask=(q_offs[:, None] < Sq) & (k_offs[None, :] < Sk),
                )
    tl.store(
        out_ptr + b * Sq * D + q_offs[:, None] * D + t[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(q_offs[:, None] < Sq) & (t[None, :] < D),
    )


@triton.jit
def _score_grad(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    b,
    q_offs,
    k_offs,
    q_valid,
    k_valid,
    lse,
    delta,
    Sq,
    Sk,
    D,
    scale,
    SOFTMAX: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(a, dS) for a tile: the weights and the gradient of the loss w.r.t. the raw scores."""
    s = _scores(
        q_ptr, k_ptr, b, q_offs, k_offs, Sq, Sk, D, Sq * D, Sk * D, BQ, BK, BD, PRECISION, UPCAST
    )
    a = _activate(s, scale, lse, q_valid, k_valid, SOFTMAX)
    # dA = dO · Vᵀ, the same tiled product as the scores with (dO, V) for (Q, K).
    da = _scores(
        do_ptr, v_ptr, b, q_offs, k_offs, Sq, Sk, D, Sq * D, Sk * D, BQ, BK, BD, PRECISION, UPCAST
    )
    if SOFTMAX:
        ds = a * (da - delta[:, None])
    else:
        ds = da * a * (1.0 - a)
    return a, ds * scale


@triton.jit
def _row_stats(lse_ptr, delta_ptr, b, q_offs, Sq, BQ: tl.constexpr, SOFTMAX: tl.constexpr):
    """The softmax backward's per-query (log-sum-exp, rowsum(dO * O)); zeros for sigmoid."""
    lse = tl.zeros((BQ,), dtype=tl.float32)
    delta = tl.zeros((BQ,), dtype=tl.float32)
    if SOFTMAX:
        lse = tl.load(lse_ptr + b * Sq + q_offs, mask=q_offs < Sq, other=float("-inf"))
        delta = tl.load(delta_ptr + b * Sq + q_offs, mask=q_offs < Sq, other=0.0)
    return lse, delta


@triton.jit
def _backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    qmask_ptr,
    kmask_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    Sq,
    Sk,
    D,
    scale,
    SOFTMAX: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_q = tl.program_id(0)
    b = tl.program_id(1)
    pid_t = tl.program_id(2)
    q_offs = pid_q * BQ + tl.arange(0, BQ)
    t = pid_t * BT + tl.arange(0, BT)
    q_valid = _valid(qmask_ptr, b, q_offs, Sq)
    lse, delta = _row_stats(lse_ptr, delta_ptr, b, q_offs, Sq, BQ, SOFTMAX)
    acc = tl.zeros((BQ, BT), dtype=tl.float32)
    for k0 in range(0, Sk, BK):
        k_offs = k0 + tl.arange(0, BK)
        k_valid = _valid(kmask_ptr, b, k_offs, Sk)
        a, ds = _score_grad(
            q_ptr,
            k_ptr,
            v_ptr,
            do_ptr,
            b,
            q_offs,
            k_offs,
            q_valid,
            k_valid,
            lse,
            delta,
            Sq,
            Sk,
            D,
            scale,
            SOFTMAX,
            BQ,
            BK,
            BD,
            PRECISION,
            UPCAST,
        )
        k = tl.load(
            k_ptr + b * Sk * D + k_offs[:, None] * D + t[None, :],
            mask=(k_offs[:, None] < Sk) & (t[None, :] < D),
            other=0.0,
        )
        acc += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    tl.store(
        dq_ptr + b * Sq * D + q_offs[:, None] * D + t[None, :],
        acc.to(dq_ptr.dtype.element_ty),
        mask=(q_offs[:, None] < Sq) & (t[None, :] < D),
    )


@triton.jit
def _backward_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    qmask_ptr,
    kmask_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    Sq,
    Sk,
    D,
    scale,
    SOFTMAX: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_k = tl.program_id(0)
    b = tl.program_id(1)
    pid_t = tl.program_id(2)
    k_offs = pid_k * BK + tl.arange(0, BK)
    t = pid_t * BT + tl.arange(0, BT)
    k_valid = _valid(kmask_ptr, b, k_offs, Sk)
    acc_dk = tl.zeros((BK, BT), dtype=tl.float32)
    acc_dv = tl.zeros((BK, BT), dtype=tl.float32)
    for q0 in range(0, Sq, BQ):
        q_offs = q0 + tl.arange(0, BQ)
        q_valid = _valid(qmask_ptr, b, q_offs, Sq)
        lse, delta = _row_stats(lse_ptr, delta_ptr, b, q_offs, Sq, BQ, SOFTMAX)
        a, ds = _score_grad(
            q_ptr,
            k_ptr,
            v_ptr,
            do_ptr,
            b,
            q_offs,
            k_offs,
            q_valid,
            k_valid,
            lse,
            delta,
            Sq,
            Sk,
            D,
            scale,
            SOFTMAX,
            BQ,
            BK,
            BD,
            PRECISION,
            UPCAST,
        )
        rows = (q_offs[:, None] < Sq) & (t[None, :] < D)
        q = tl.load(q_ptr + b * Sq * D + q_offs[:, None] * D + t[None, :], mask=rows, other=0.0)
        do = tl.load(do_ptr + b * Sq * D + q_offs[:, None] * D + t[None, :], mask=rows, other=0.0)
        acc_dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
        acc_dv += _dot(tl.trans(a.to(do.dtype)), do, PRECISION, UPCAST)
    cols = (k_offs[:, None] < Sk) & (t[None, :] < D)
    tl.store(
        dk_ptr + b * Sk * D + k_offs[:, None] * D + t[None, :],
        acc_dk.to(dk_ptr.dtype.element_ty),
        mask=cols,
    )
    tl.store(
        dv_ptr + b * Sk * D + k_offs[:, None] * D + t[None, :],
        acc_dv.to(dv_ptr.dtype.element_ty),
        mask=cols,
    )
