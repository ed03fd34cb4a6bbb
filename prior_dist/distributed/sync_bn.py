"""Batch norm synchronised across ranks, on any backend, and under bf16/fp16 weights.

`AllReduceSyncBatchNorm` all-reduces the batch statistics (two passes: sums and the count,
then the centred second moment) through autograd-aware collectives: it runs on gloo and NCCL
alike and gives the statistics of the global batch, and nothing in it reads a device value on
the host. torch's `SyncBatchNorm` was used on CUDA before; its forward indexes with a boolean
mask, which waits for the device once per layer (53 host syncs a step for a ResNet-50).
With one rank there is nothing to synchronise, and the converter keeps the plain norm (cuDNN's
kernel on CUDA).

Mixed precision: DeepSpeed casts parameters to bf16/fp16 and leaves buffers in fp32, so a norm
holds half-precision weight and bias beside fp32 running statistics. CUDA's batch norm refuses
that mix in the backward pass ("Expected running_mean to have type BFloat16 but got Float",
seen on an H200); it accepts half-precision input with fp32 weight and statistics, the layout
autocast uses. The CUDA norms here hand the kernel their weight and bias in the statistics'
dtype (fp32): the statistics stay exact, and gradients flow back to the half-precision weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from prior_dist.distributed.collectives import all_reduce_sum_with_grad


class _AffineInStatsDtype:
    """Mixin for torch's norms: weight and bias are handed to the kernel in the running
    statistics' dtype when they differ (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, stats = self.weight, self.running_mean
        if weight is None or stats is None or weight.dtype == stats.dtype:
            return super().forward(x)
        # The parent's forward run directly (no module hooks fire twice, as ZeRO-3's would
        # under a functional_call) with the upcast tensors in the parameters' places.
        held = self._parameters["weight"], self._parameters["bias"]
        self._parameters["weight"] = held[0].to(stats.dtype)
        self._parameters["bias"] = held[1].to(stats.dtype)
        try:
            return super().forward(x)
        finally:
            self._parameters["weight"], self._parameters["bias"] = held


class FloatStatsBatchNorm(_AffineInStatsDtype, nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose half-precision weights meet fp32 statistics in fp32."""


class AllReduceSyncBatchNorm(_AffineInStatsDtype, nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same parameters and buffers) with global-batch statistics in training;
    in evaluation the running statistics, half-precision weights meeting them in fp32."""

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return all_reduce_sum_with_grad(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision computes in fp32
        # A fill on the device, not a tensor copied from the host (that copy would wait).
        local_count = xf.new_full((1,), x.numel() / channels)
        sums = self._all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), local_count]))
        count = sums[channels]
        mean = sums[:channels] / count
        centred = xf - mean[None, :, None, None]
        var = self._all_reduce((centred * centred).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = (
                out * self.weight.to(xf.dtype)[None, :, None, None]
                + self.bias.to(xf.dtype)[None, :, None, None]
            )
        return out.to(x.dtype)


def convert_batchnorm(module: nn.Module, device_type: str, sync: bool) -> nn.Module:
    """Every `BatchNorm2d` below `module` replaced, state kept: synchronised over the ranks
    when `sync` (`AllReduceSyncBatchNorm`, any backend; computed in fp32), else the plain norm
    made safe under bf16/fp16 weights (`FloatStatsBatchNorm`: neither CUDA's nor the CPU's
    kernel takes half weights beside fp32 statistics in training)."""
    kind = AllReduceSyncBatchNorm if sync else FloatStatsBatchNorm
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = kind(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            held = next(iter(child.state_dict().values()), None)  # stays where the model is
            if held is not None:
                replacement.to(held.device, held.dtype if held.is_floating_point() else None)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child, device_type, sync)
    return module
