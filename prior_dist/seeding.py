"""Seeds derived from names: the one home of the hash behind every per-sample and per-step draw.

A draw that must come out the same whichever rank, worker or resumed process makes it is seeded
from a text naming it (`"{seed}|{epoch}|{key}"` for a sample's augmentation, `...|noise` for
its reconstruction noise, `"{seed}|dropout|{rank}|{step}|{micro}"` for a forward pass's
dropout, the phantom generator's parts). blake2b, not Python's `hash`: the same on every
machine, Python version and `PYTHONHASHSEED`.
"""

from __future__ import annotations

import hashlib


def stable_hash(text: str) -> int:
    """A 64-bit unsigned integer from `text` (blake2b, 8 bytes, little-endian)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def torch_seed(text: str) -> int:
    """`stable_hash` in 63 bits: a seed `torch.manual_seed` and int64 tensors take."""
    return stable_hash(text) >> 1
