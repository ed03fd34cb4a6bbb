"""Triton local-attention kernels against the float64 reference (interpreter on CPU, or CUDA)."""

import pytest
import torch

pytest.importorskip("triton")

from prior_dist.kernels.local_attention import (
    interpreter_on,
    launch_backward,  # noqa: E402
    launch_forward,
    triton_local_attention,
    unsupported_reason,
)
from prior_dist.ops.local_attention import (
    local_attention,  # noqa: E402
    local_attention_reference,
    resolve_local_attention_impl,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreter_on(),
    reason="needs CUDA or TRITON_INTERPRET=1 (set by conftest)",
)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

# (B, Sq, Sk, D): odd sizes that are not multiples of the blocks, single rows, D < 16.
SHAPES = [(2, 5, 7, 12), (1, 19, 33, 37), (3, 1, 9, 16), (2, 17, 1, 40)]


def _inputs(shape, dtype, seed, fully_masked=True):
    b, sq, sk, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, d, generator=g).to(dtype) for n in (sq, sk, sk))
    query_mask = torch.rand(b, sq, generator=g) > 0.25
    key_mask = torch.rand(b, sk, generator=g) > 0.3
    query_mask[:, 0] = True
    key_mask[:, 0] = True
    if fully_masked and b > 1:
        key_mask[-1] = False  # a sample whose keys are all masked
        query_mask[0, -1] = False  # and a masked query row
    return [t.to(DEVICE) for t in (q, k, v, query_mask, key_mask)]


def _close(got, expected, dtype, what):
    scale = expected.abs().max().clamp_min(1.0)
    error = float((got.double() - expected).abs().max() / scale)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]}"


def _reference(q, k, v, qm, km, scale, activation, grad):
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    out, att = local_attention_reference(q64, k64, v64, qm, km, scale, activation, True)
    out.backward(grad.double())
    return out.detach(), att.detach(), q64.grad, k64.grad, v64.grad


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference_fp32(shape, activation):
    q, k, v, qm, km = _inputs(shape, torch.float32, seed=sum(shape))
    grad = torch.randn_like(q)
    ref_out, ref_att, ref_dq, ref_dk, ref_dv = _reference(q, k, v, qm, km, 0.37, activation, grad)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = triton_local_attention(*leaves, qm, km, scale=0.37, activation=activation)
    out.backward(grad)
    _close(out, ref_out, torch.float32, "out")
    for leaf, expected, name in zip(leaves, (ref_dq, ref_dk, ref_dv), "qkv"):
        _close(leaf.grad, expected, torch.float32, f"d{name}")
    _, attention = triton_local_attention(
        q, k, v, qm, km, scale=0.37, activation=activation, return_attention=True
    )
    _close(attention, ref_att, torch.float32, "attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_half_precision_inputs_accumulate_in_fp32(dtype, activation):
    q, k, v, qm, km = _inputs((2, 21, 18, 24), dtype, seed=3)
    grad = torch.randn_like(q)
    ref_out, _, ref_dq, ref_dk, ref_dv = _reference(q, k, v, qm, km, 0.2, activation, grad)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = triton_local_attention(*leaves, qm, km, scale=0.2, activation=activation)
    out.backward(grad)
    assert out.dtype == dtype and leaves[0].grad.dtype == dtype
    _close(out, ref_out, dtype, "out")
    for leaf, expected, name in zip(leaves, (ref_dq, ref_dk, ref_dv), "qkv"):
        _close(leaf.grad, expected, dtype, f"d{name}")


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_every_output_element_is_written(activation):
    """Outputs are poisoned with NaN first: an element a kernel skips stays NaN."""
    q, k, v, qm, km = _inputs((2, 18, 20, 35), torch.float32, seed=9)
    out = torch.full_like(q, float("nan"))
    attention = torch.full((2, 18, 20), float("nan"), device=DEVICE)
    out, lse, attention = launch_forward(
        q, k, v, qm, km, 0.5, activation, store_attention=True, out=out, attention=attention
    )
    grad = torch.randn_like(q)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    launch_backward(q, k, v, out, grad, qm, km, lse, 0.5, activation, dq=dq, dk=dk, dv=dv)
    for name, t in {"out": out, "attention": attention, "dq": dq, "dk": dk, "dv": dv}.items():
        assert torch.isfinite(t).all(), f"{name} has unwritten elements"
    ref_out, ref_att, ref_dq, ref_dk, ref_dv = _reference(q, k, v, qm, km, 0.5, activation, grad)
    for got, expected, name in (
        (out, ref_out, "out"),
        (attention, ref_att, "attention"),
        (dq, ref_dq, "dq"),
        (dk, ref_dk, "dk"),
        (dv, ref_dv, "dv"),
    ):
        _close(got, expected, torch.float32, name)
    # Masked query rows and fully masked samples give exact zeros, as in the reference.
    assert (out[~qm] == 0).all() and (attention[1] == 0).all() and (dk[1] == 0).all()


def test_dispatch_explicit_triton_and_auto():
    q, k, v, qm, km = _inputs((2, 6, 5, 8), torch.float32, seed=1)
    assert resolve_local_attention_impl("triton", q, k, v) == "triton"
    expected = "triton" if DEVICE == "cuda" else "torch"
    assert resolve_local_attention_impl("auto", q, k, v) == expected
    torch.testing.assert_close(
        local_attention(q, k, v, qm, km, scale=0.3, impl="triton"),
        local_attention(q, k, v, qm, km, scale=0.3, impl="torch"),
        rtol=1e-5,
        atol=1e-6,
    )
    bad_v = torch.randn(2, 5, 9, device=DEVICE)
    assert "widths differ" in unsupported_reason(q, k, bad_v)
    with pytest.raises(RuntimeError, match="widths differ"):
        local_attention(q, k, bad_v, scale=0.3, impl="triton")


def test_model_losses_equal_with_triton_local_attention():
    from prior_dist.models import build_model, model_config
    from prior_dist.models.config import HeadsConfig
    from prior_dist.task import PriorTask, stage_plan
    from tests.model_batch import ragged_batch

    results = []
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = model_config("tiny")
        cfg = cfg.replace(heads=HeadsConfig(**{**cfg.heads.__dict__, "local_attention_impl": impl}))
        model = build_model(cfg).to(DEVICE)
        batch = {k: v.to(DEVICE) for k, v in ragged_batch(cfg, sentence_counts=(3, 1, 5)).items()}
        out = PriorTask(model)(batch, stage_plan(1))
        out["total"].backward()
        results.append((out, model.local_alignment.text_query.weight.grad.clone()))
    (a, ga), (b, gb) = results
    for name in ("local_image", "local_text", "global"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    DEVICE == "cuda", reason="on a GPU the suite runs the benchmark itself, compiled for CUDA"
)
def test_kernel_benchmark_script_runs_in_smoke_mode(tmp_path):
    """bench/kernels.py (the GPU suite's benchmark) runs end to end on tiny shapes, through
    the interpreter (whose numpy use broke on the GPU machine's Triton 3.6, 2026-12-04)."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/kernels.py"),
            "--smoke",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["activation"] for r in results] == ["sigmoid", "softmax"]
    assert all(r["triton"]["max_rel_diff_vs_eager"] < 1e-5 for r in results)


def test_auto_falls_back_once_when_the_kernel_fails(monkeypatch):
    import prior_dist.kernels.local_attention as host
    import prior_dist.ops.local_attention as ops

    q, k, v, qm, km = _inputs((2, 6, 5, 8), torch.float32, seed=4)
    monkeypatch.setattr(ops, "_AUTO_FAILED", [])
    monkeypatch.setattr(ops, "resolve_local_attention_impl", lambda impl, *a: "triton")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(host, "triton_local_attention", broken)
    with pytest.warns(UserWarning, match="simulated compile failure"):
        out = local_attention(q, k, v, qm, km, scale=0.3, impl="auto")
    torch.testing.assert_close(out, local_attention_reference(q, k, v, qm, km, 0.3))
    assert len(ops._AUTO_FAILED) == 1
    with pytest.raises(RuntimeError, match="simulated"):
        local_attention(q, k, v, qm, km, scale=0.3, impl="triton")
