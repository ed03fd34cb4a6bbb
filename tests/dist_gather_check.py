"""Run under torchrun with 2 ranks: the global loss over a real gloo all-gather with gradient
equals, after gradient averaging, the single-process loss on the concatenated batch; the
synchronised batch norm equals one norm over the concatenated batch."""

import copy
import json
import sys

import torch
import torch.distributed as dist

from prior_dist.distributed import AllGather
from prior_dist.distributed.sync_bn import convert_batchnorm
from prior_dist.losses import SingleProcessGather, global_contrastive_loss, prototype_l1_loss
from prior_dist.task.task import rows_per_rank
from prior_dist.testing.dispatch_count import StepCounter


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank, dim = 3, 5
    torch.manual_seed(0)  # same weights and data on every rank
    image_proj = torch.nn.Linear(7, dim).double()
    text_proj = torch.nn.Linear(6, dim).double()
    x_img = torch.randn(world * per_rank, 7, dtype=torch.float64)
    x_txt = torch.randn(world * per_rank, 6, dtype=torch.float64)
    scale = torch.tensor(20.0, dtype=torch.float64)
    params = list(image_proj.parameters()) + list(text_proj.parameters())

    full = global_contrastive_loss(image_proj(x_img), text_proj(x_txt), scale)
    full_grads = torch.autograd.grad(full, params)

    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    local = global_contrastive_loss(
        image_proj(x_img[rows]), text_proj(x_txt[rows]), scale, AllGather()
    )
    grads = torch.autograd.grad(local, params)
    mean_loss = local.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    errors = []
    for g, ref in zip(grads, full_grads):
        g = g.clone()
        dist.all_reduce(g)
        errors.append(float((g / world - ref).abs().max()))
    result = {
        "rank": rank,
        "loss_error": float((mean_loss - full).abs()),
        "grad_error": max(errors),
        "local_loss": float(local),
        **_pooled_sentence_mean(rank, world),
        **_sync_batchnorm(rank, world),
    }
    with open(f"{out}.{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


def _pooled_sentence_mean(rank: int, world: int) -> dict:
    """L_proto with `sentence_loss_mean: pooled` on ragged reports (rank 0 holds 1 and 5
    sentences, rank 1 holds 4 and 2): averaged over ranks, value and gradients equal the one
    mean over all 12 sentences of the whole batch."""
    torch.manual_seed(1)
    proj = torch.nn.Linear(4, 3).double()
    x = torch.randn(world * 2, 6, 4, dtype=torch.float64)
    q = torch.randn(world * 2, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([1, 5, 4, 2][: world * 2])
    mask = torch.arange(6)[None, :] < lengths[:, None]

    full = prototype_l1_loss(proj(x), q, mask, rows_per_rank(mask, SingleProcessGather()))
    by_sentence = (proj(x) - q).abs().mean(-1)[mask].mean()  # the slow, obvious formula
    full_grads = torch.autograd.grad(full, list(proj.parameters()))
    rows = slice(rank * 2, rank * 2 + 2)
    local = prototype_l1_loss(
        proj(x[rows]), q[rows], mask[rows], rows_per_rank(mask[rows], AllGather())
    )
    grads = torch.autograd.grad(local, list(proj.parameters()))
    mean_loss = local.detach().clone()
    dist.all_reduce(mean_loss)
    errors = []
    for g, ref in zip(grads, full_grads):
        g = g.clone()
        dist.all_reduce(g)
        errors.append(float((g / world - ref).abs().max()))
    return {
        "pooled_loss_error": float((mean_loss / world - full).abs()),
        "pooled_slow_error": float((full - by_sentence).abs()),
        "pooled_grad_error": max(errors),
    }


def _sync_batchnorm(rank: int, world: int) -> dict:
    """The all-reduce batch norm on each rank's rows equals one norm over the whole batch
    (outputs, running statistics, summed weight gradients), with no host sync in its forward."""
    torch.manual_seed(1)
    full = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        full.weight.uniform_(0.5, 1.5)
        full.bias.uniform_(-0.5, 0.5)
    synced = convert_batchnorm(torch.nn.Sequential(copy.deepcopy(full)), "cpu", True)[0]
    x = torch.randn(world * 3, 4, 5, 5, dtype=torch.float64)
    scale = torch.randn_like(x)
    expected = full(x)
    (expected * scale).sum().backward()
    mine = slice(rank * 3, rank * 3 + 3)
    with StepCounter() as counter:
        out = synced(x[mine])
    (out * scale[mine]).sum().backward()
    grads = torch.cat([synced.weight.grad, synced.bias.grad])
    dist.all_reduce(grads)
    return {
        "bn_kind": type(synced).__name__,
        "bn_output_error": float((out - expected[mine]).abs().max()),
        "bn_stats_error": float(
            max(
                (synced.running_mean - full.running_mean).abs().max(),
                (synced.running_var - full.running_var).abs().max(),
            )
        ),
        "bn_grad_error": float((grads - torch.cat([full.weight.grad, full.bias.grad])).abs().max()),
        "bn_forward_syncs": counter.total_syncs,
    }


if __name__ == "__main__":
    main(sys.argv[1])
