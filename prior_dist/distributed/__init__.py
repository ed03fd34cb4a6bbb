"""Process-group helpers applied from outside the model: start-up, gathers, SyncBatchNorm."""

from prior_dist.distributed.gather import AllGather

__all__ = ["AllGather"]
