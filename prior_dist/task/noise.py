"""Randomness tied to samples: the same sample gets the same noise on any number of ranks.

Gumbel noise for the prototype bank (one row of K uniforms per sentence) and the channel mask
of the stage-3 feature dropout. Each sample has a 63-bit seed from its key, the epoch and the
run seed (`noise_seeds`, on the host, from the batch's keys); the uniforms are a counter-based
hash of (seed, stream, element index), computed with integer tensor ops on whatever device the
seeds are on. So:
- a sample's values do not depend on the batch it is in, its position there, the rank, the
  number of sentences the batch is padded to, or the device (integer maths is exact);
- drawing is a fixed handful of kernels per stream whatever the batch size, with no host
  generator and no copy, and a stream a stage does not use is never drawn.
"""

from __future__ import annotations

import math

import torch

from prior_dist.seeding import torch_seed

STREAMS = {"sentences": 1, "generated": 2, "feature_keep": 3}
_MASK32 = 0xFFFFFFFF
# Multipliers of the 32-bit mixer. Each is below 2**31, so a product with a 32-bit value stays
# below 2**63: no int64 overflow on any device.
_MUL_A, _MUL_B = 0x21F0AAAD, 0x735A2D97


def noise_seeds(keys: list[str], epoch: int, seed: int) -> torch.Tensor:
    """int64 `[B]`: each sample's noise seed from (run seed, epoch, key); 63 bits."""
    out = [torch_seed(f"{seed}|{epoch}|{key}|noise") for key in keys]
    return torch.tensor(out, dtype=torch.int64)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mix of 32-bit values held in int64 (xor-shift-multiply)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 15)


def counter_uniform(seeds_B: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 `[B, *shape]` in (0, 1): element i of sample b is a hash of (seeds[b], stream,
    i), i the element's flat index within `shape`; on the seeds' device."""
    seeds = seeds_B.to(torch.int64)
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _mix32(_mix32(low ^ _mix32(high ^ stream)) ^ (stream * 0x5851F42D & _MASK32))
    count = math.prod(shape)
    index = torch.arange(count, device=seeds.device, dtype=torch.int64)
    x = _mix32(_mix32(index[None, :] ^ key[:, None]) ^ high[:, None])
    # 24 bits, centred in their bin: never exactly 0 or 1 (the Gumbel transform takes logs).
    uniform = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return uniform.reshape(seeds.shape[0], *shape)


class SampleNoise:
    """The noise of one batch, drawn on demand from its samples' seeds (`[B]`, on the device).

    `draw(name, shape)` gives `[B, *shape]` U(0, 1) for stream `name` (`sentences`, `generated`,
    `feature_keep`). A row of a stream is a prefix-stable sequence: the first S rows of a
    `(S', K)` draw equal an `(S, K)` draw for S <= S', so padding changes nothing.
    """

    def __init__(self, seeds_B: torch.Tensor):
        self.seeds = seeds_B

    def draw(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return counter_uniform(self.seeds, STREAMS[name], tuple(shape))
