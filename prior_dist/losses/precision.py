"""Loss arithmetic runs in fp32 at least (logits at scale 100, softmaxes, KL), fp64 stays fp64."""

import torch


def fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()
