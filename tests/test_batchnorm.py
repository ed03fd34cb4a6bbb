"""Batch norm as the trainer converts it: synchronised, and safe under DeepSpeed's mixed precision
(half-precision weight and bias beside fp32 running statistics). On a CUDA machine (the GPU
suite) these run on the GPU, where the mix once failed the backward pass."""

import copy

import pytest
import torch
from torch import nn

from prior_dist.distributed.sync_bn import (
    AllReduceSyncBatchNorm,
    FloatStatsBatchNorm,
    convert_batchnorm,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.BatchNorm2d(8)), nn.ReLU())
    with torch.no_grad():  # non-trivial affine parameters and statistics to carry over
        net[1][0].weight.uniform_(0.5, 1.5)
        net[1][0].bias.uniform_(-0.5, 0.5)
        net[1][0].running_mean.uniform_(-1, 1)
    return net


@pytest.mark.parametrize(
    "device, sync, kind",
    [
        ("cpu", True, AllReduceSyncBatchNorm),
        ("cpu", False, FloatStatsBatchNorm),
        ("cuda", True, AllReduceSyncBatchNorm),
        ("cuda", False, FloatStatsBatchNorm),
    ],
)
def test_every_batchnorm_is_replaced_with_its_state(device, sync, kind):
    """...and on the device the model is on (on a GPU machine, the model is there)."""
    net = _net().to(DEVICE)
    before = copy.deepcopy(net[1][0].state_dict())
    convert_batchnorm(net, device, sync)
    norm = net[1][0]
    assert type(norm) is kind
    for name, value in before.items():
        assert torch.equal(norm.state_dict()[name], value), name
    assert norm.weight.device == norm.running_mean.device == before["weight"].device


@pytest.mark.parametrize("kind", [FloatStatsBatchNorm, AllReduceSyncBatchNorm])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_meet_fp32_statistics(kind, dtype):
    """Parameters cast as DeepSpeed casts them, buffers left fp32: forward and backward run,
    the statistics stay fp32 and match an fp32 norm's, gradients reach the half weights."""
    if dtype is torch.float16 and DEVICE == "cpu":
        pytest.skip("fp16 training is CUDA-only")
    reference = _net().to(DEVICE)
    mixed = convert_batchnorm(copy.deepcopy(reference), "cuda", kind is AllReduceSyncBatchNorm)
    assert type(mixed[1][0]) is kind
    for p in mixed.parameters():
        p.data = p.data.to(dtype)
    x = torch.randn(6, 3, 12, 12, device=DEVICE)
    for _ in range(2):  # two steps of running statistics
        out = mixed(x.to(dtype))
        out.float().square().mean().backward()
        expected = reference(x)
        expected.square().mean().backward()
    norm, ref = mixed[1][0], reference[1][0]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    assert norm.running_mean.dtype == torch.float32 and norm.running_var.dtype == torch.float32
    torch.testing.assert_close(norm.running_mean, ref.running_mean, atol=5e-3, rtol=1e-2)
    torch.testing.assert_close(norm.running_var, ref.running_var, atol=5e-3, rtol=1e-2)
    assert norm.weight.grad.dtype == dtype
    torch.testing.assert_close(norm.weight.grad.float(), ref.weight.grad, atol=2e-2, rtol=5e-2)
    # The upcast copies were only lent to the kernel: the parameters are the module's again.
    assert isinstance(norm.weight, nn.Parameter) and norm.weight.dtype == dtype
    mixed.eval()
    assert mixed(x.to(dtype)).dtype == dtype
