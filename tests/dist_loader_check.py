"""Run under torchrun with 2 ranks: loader batches per step, gathered over a real gloo group."""

import json
import sys

import torch
import torch.distributed as dist

from prior_dist.data.loader import PriorLoader
from prior_dist.data.tokenize import build_wordpiece
from prior_dist.data.transforms import TransformConfig


def main(shards: str, vocab_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = build_wordpiece(shards, vocab_dir)

    def loader():
        return PriorLoader(
            shards, tokenizer, 3, seed=11, num_workers=2, transform=TransformConfig(image_size=32)
        )

    full = loader()
    steps = []
    for batch in full:
        # A collective every step: unequal batch counts across ranks would hang or fail here.
        count = torch.tensor([len(batch["key"])])
        dist.all_reduce(count)
        gathered = [None] * world
        dist.all_gather_object(gathered, batch["key"])
        steps.append(gathered)
    first = loader()
    head = []
    for batch in first:
        head.append(batch["key"])
        if len(head) == 2:
            break
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = [b["key"] for b in resumed]
    resume_ok = torch.tensor([int(head + tail == [s[rank] for s in steps])])
    dist.all_reduce(resume_ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(
                {
                    "world": world,
                    "steps": steps,
                    "num_batches": len(full),
                    "resume_ok": bool(resume_ok.item()),
                },
                handle,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
