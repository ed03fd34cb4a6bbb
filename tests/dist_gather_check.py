"""Run under torchrun with 2 ranks: the global loss over a real gloo all-gather with gradient
equals, after gradient averaging, the single-process loss on the concatenated batch."""

import json
import sys

import torch
import torch.distributed as dist

from prior_dist.distributed import AllGather
from prior_dist.losses import global_contrastive_loss


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
    }
    with open(f"{out}.{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
