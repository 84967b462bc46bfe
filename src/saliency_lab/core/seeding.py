"""Per-image seeding: every stochastic component draws image b's randomness from (run seed, dataset index).

Results then do not depend on the batch size or the number of processes (docs/architecture.md, explainer
contract): :func:`derive_seeds` gives one int64 seed per image, :func:`seeded_generator` turns any tuple of
integers (e.g. (image seed,) or (seed, epoch, stream, index)) into a torch generator, and
:func:`per_image_uniforms` draws a few uniforms per image from such a tuple.
"""
from __future__ import annotations

import torch
from torch import Tensor

# derive_seeds packs (seed, index) into one int64; these bounds keep the packing injective.
_SEED_BITS = 31
_INDEX_BITS = 32
_MASK64 = 2**64 - 1


def derive_seeds(seed: int, index: Tensor) -> Tensor:
    """Per-image seeds (B,) int64 from a run seed and the images' dataset indices (B,).

    seed * 2**32 + index is injective for 0 <= seed < 2**31 and 0 <= index < 2**32, so every image gets
    its own stream whatever the batch size or number of processes (docs/architecture.md, explainer contract).
    """
    if not 0 <= seed < 2**_SEED_BITS:
        raise ValueError(f"seed must be in [0, 2**{_SEED_BITS}), got {seed}")
    index = torch.as_tensor(index, dtype=torch.int64)
    if index.numel() and (index.min() < 0 or index.max() >= 2**_INDEX_BITS):
        raise ValueError(f"image indices must be in [0, 2**{_INDEX_BITS})")
    return seed * 2**_INDEX_BITS + index


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood, OOPSLA 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_generator(device: torch.device | str, *parts: int) -> torch.Generator:
    """A generator on ``device`` seeded by the integers ``parts``, e.g. (image seed,) or (image seed, block).

    The parts are hashed with SplitMix64 instead of passed as they are, because torch's CPU generator
    (mt19937) keeps only the low 32 bits of its seed: ``derive_seeds`` puts the run seed in the high 32
    bits, so on the CPU ``manual_seed(seed * 2**32 + index)`` would ignore the run seed altogether.
    """
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return torch.Generator(device=device).manual_seed(state)


def per_image_uniforms(seed: int, epoch: int, stream: int, indices: Tensor, count: int = 1) -> Tensor:
    """(B, count) uniforms in [0, 1) on the CPU; image b's draw depends only on (seed, epoch, stream,
    indices[b]), so it does not change with the batch size or the number of processes."""
    rows = [torch.rand(count, generator=seeded_generator("cpu", seed, epoch, stream, int(i)))
            for i in indices.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, count)
