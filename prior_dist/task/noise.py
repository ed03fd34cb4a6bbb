"""Randomness tied to samples: the same sample gets the same noise on any number of ranks.

Gumbel noise for the prototype bank (one row of K uniforms per sentence, from the sample's key,
the epoch and the run seed) and the channel mask of the stage-3 feature dropout.
"""

from __future__ import annotations

import hashlib

import torch


def _seed(seed: int, epoch: int, key: str, tag: str) -> int:
    digest = hashlib.blake2b(f"{seed}|{epoch}|{key}|{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def per_sample_uniform(
    keys: list[str], epoch: int, seed: int, tag: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """`[B, *shape]` U(0, 1); row b depends only on (seed, epoch, keys[b], tag).

    A CPU generator fills in order, so the first rows of a longer draw equal a shorter one:
    padding the sentence axis differently on different ranks changes nothing.
    """
    out = torch.empty(len(keys), *shape)
    for b, key in enumerate(keys):
        out[b] = torch.rand(
            shape, generator=torch.Generator().manual_seed(_seed(seed, epoch, key, tag))
        )
    return out


def sample_noise(
    batch: dict,
    epoch: int,
    seed: int,
    num_sentences: int,
    num_queries: int,
    num_prototypes: int,
    embed_dim: int,
    device: torch.device,
) -> dict:
    keys = batch["key"]
    return {
        "sentences": per_sample_uniform(
            keys, epoch, seed, "spb", (num_sentences, num_prototypes)
        ).to(device),
        "generated": per_sample_uniform(keys, epoch, seed, "gen", (num_queries, num_prototypes)).to(
            device
        ),
        "feature_keep": per_sample_uniform(keys, epoch, seed, "drop", (embed_dim,)).to(device),
    }
