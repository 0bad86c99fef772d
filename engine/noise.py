"""The engine's one source of randomness: one seeded generator per batch item, shared by all backends."""
from __future__ import annotations

import secrets
from typing import Sequence

import numpy as np


def resolve_seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    """Seeds for ``count`` items: ``seed + i``, an explicit list, or fresh random ones."""
    if seed is None:
        base = secrets.randbelow(2**31)
        return [base + i for i in range(count)]
    if isinstance(seed, int):
        return [seed + i for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images")
    return seeds


class NoiseSource:
    """Standard normal float32 noise; item i's draws depend only on seeds[i], so batching never changes them."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self._generators = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]

    def randn(self, item_shape: tuple[int, ...]) -> np.ndarray:
        """One draw of shape ``item_shape`` per item, stacked: (B, *item_shape)."""
        return np.stack([g.standard_normal(item_shape, dtype=np.float32) for g in self._generators])
