"""Hungarian matching of generated prototypes to target sentences, for a whole batch at once.

The cost matrices cross to the host in one transfer, SciPy solves each sample, and the
assignments come back in one transfer: no round-trip per sample. `PendingCosts` lets the
caller start the transfer early and collect the assignment later.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


class PendingCosts:
    """Cost matrices on their way to the host: the copy is issued at once (into pinned memory
    on CUDA, behind the work already queued), so the device can go on with the rest of the
    forward pass while it travels; `assignment()` waits for it (the one host sync) and solves."""

    @torch.no_grad()
    def __init__(self, cost_BQT: torch.Tensor):
        batch, num_out, num_tgt = cost_BQT.shape
        if num_out != num_tgt:
            raise ValueError(
                f"matching needs as many targets as outputs, got {num_tgt} vs {num_out}"
            )
        self.device = cost_BQT.device
        cost = cost_BQT.detach().float()
        self.done = None
        if self.device.type == "cuda":
            self.host = torch.empty(cost.shape, dtype=cost.dtype, pin_memory=True)
            self.host.copy_(cost, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = cost.to("cpu")

    def assignment(self) -> torch.Tensor:
        """`assignment [B, Q]`: output i of sample b is matched to target `assignment[b, i]`."""
        if self.done is not None:
            self.done.synchronize()
        costs = self.host.numpy()
        if not np.isfinite(costs).all():
            raise FloatingPointError("matching cost has NaN or inf entries (diverged features?)")
        batch, num_out, _ = costs.shape
        columns = np.empty((batch, num_out), dtype=np.int64)
        for b in range(batch):
            rows, cols = linear_sum_assignment(costs[b])
            columns[b, rows] = cols
        return torch.from_numpy(columns).to(self.device, non_blocking=True)


def hungarian_assignment(cost_BQT: torch.Tensor) -> torch.Tensor:
    """`assignment [B, Q]`: output i of sample b is matched to target `assignment[b, i]`.

    Needs Q == T (targets are padded to the number of queries).
    """
    return PendingCosts(cost_BQT).assignment()


def align_to_targets(
    outputs_BQD: torch.Tensor, assignment_BQ: torch.Tensor, mode: str = "correct"
) -> torch.Tensor:
    """Reorder outputs so that row j is the output matched to target j.

    `correct` applies the inverse of the assignment; `reference` (the quirk, spec section 5)
    reorders with the assignment itself, so rows are not paired with their matched targets.
    """
    if mode == "correct":
        order = torch.argsort(assignment_BQ, dim=1)
    elif mode == "reference":
        order = assignment_BQ
    else:
        raise ValueError(f"matching must be 'correct' or 'reference', got {mode!r}")
    return torch.gather(outputs_BQD, 1, order[..., None].expand(-1, -1, outputs_BQD.shape[-1]))
