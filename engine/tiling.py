"""Tiles of a large picture for the VAE, and how their outputs are blended: pure arithmetic on numpy arrays.

A ``Tiling`` covers an (H, W) grid (latent units: a tile of the encoder's input and one of the decoder's output
are the same grid boxes, scaled) with equal tiles (one static shape per picture: the shape a bundle's VAE
graph, a CUDA graph or a TensorRT profile holds) that overlap by at least ``overlap``; the last tile is moved
back to end flush with the picture rather than shrunk. Each tile's output is weighted by a ramp across the
overlaps it shares with a neighbour (the outer ``margin`` of that overlap, where the tile lacks context, gets
no weight) and the weighted outputs are summed and normalised, so no seam shows where tiles meet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from engine.errors import InputError



@dataclass(frozen=True)
class Tiling:
    """Tiles of ``tile`` x ``tile`` grid units overlapping by at least ``overlap``."""

    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise InputError(f"a tile of {self.tile} is not a positive size")
        if not 0 <= self.overlap < self.tile:
            raise InputError(f"a tile overlap of {self.overlap} must be at least 0 and less than the tile ({self.tile})")

    def spans(self, length: int) -> list[tuple[int, int]]:
        """(start, stop) of the tiles along a side of ``length``: one span where the side fits in a tile, else
        equal spans spread evenly, neighbours overlapping by at least ``overlap``."""
        if length <= self.tile:
            return [(0, length)]
        count = math.ceil((length - self.overlap) / (self.tile - self.overlap))
        last = length - self.tile
        starts = dict.fromkeys(round(i * last / (count - 1)) for i in range(count))
        return [(start, start + self.tile) for start in starts]

    def count(self, height: int, width: int) -> int:
        return len(self.spans(height)) * len(self.spans(width))


def ramp(span: tuple[int, int], spans: list[tuple[int, int]], scale: int, margin: int) -> np.ndarray:
    """Blending weights (in output units, ``scale`` per input unit) along one side of one tile: 1 inside, rising
    across the overlap with the previous tile and falling across the next, zero over its outer ``margin``."""
    start, stop = span
    weights = np.ones((stop - start) * scale, np.float32)
    index = spans.index(span)
    if index > 0:  # overlap with the previous tile: [start, previous stop)
        weights *= _rise(len(weights), (spans[index - 1][1] - start) * scale, margin * scale)
    if index < len(spans) - 1:
        weights *= _rise(len(weights), (stop - spans[index + 1][0]) * scale, margin * scale)[::-1]
    return weights


def _rise(length: int, overlap: int, margin: int) -> np.ndarray:
    """``length`` weights: ``margin`` zeros, a linear rise to 1 over the rest of the first ``overlap``, then ones."""
    margin = min(margin, overlap // 2)
    weights = np.ones(length, np.float32)
    weights[:margin] = 0.0
    weights[margin:overlap] = (np.arange(overlap - margin, dtype=np.float32) + 0.5) / (overlap - margin)
    return weights


def owned(span: tuple[int, int], spans: list[tuple[int, int]]) -> np.ndarray:
    """0/1 along one side of one tile: the cells it owns, from the middle of its overlap with the previous tile to
    the middle of the next; the tiles' owned cells partition the side."""
    start, stop = span
    index = spans.index(span)
    low = start if index == 0 else (start + spans[index - 1][1]) // 2
    high = stop if index == len(spans) - 1 else (spans[index + 1][0] + stop) // 2
    flags = np.zeros(stop - start, np.float32)
    flags[low - start : high - start] = 1.0
    return flags


def combine_statistics(parts: list[np.ndarray]) -> np.ndarray:
    """(L, B, G, 2) mean and variance of the whole from each tile's (L, B, G, 3) count, mean and variance of its
    owned cells (the parallel form of the variance: Chan, Golub and LeVeque 1979), in float64."""
    stacked = np.stack(parts).astype(np.float64)  # (T, L, B, G, 3)
    count, mean, var = stacked[..., 0], stacked[..., 1], stacked[..., 2]
    total = count.sum(0)
    whole = (count * mean).sum(0) / total
    spread = (count * (var + (mean - whole) ** 2)).sum(0) / total
    return np.stack([whole, spread], -1).astype(np.float32)


Box = tuple[tuple[int, int], tuple[int, int]]  # a tile's (rows, columns) spans on the grid


def blend(run: Callable[[list[np.ndarray], list[Box]], list[np.ndarray]], x: np.ndarray, tiling: Tiling,
          in_scale: int, out_scale: int, out_channels: int, per_call: int = 1, margin: int = 0,
          done: Callable[[int], None] | None = None) -> np.ndarray:
    """Apply ``run`` tile by tile to ``x`` (B, C, in_scale*H, in_scale*W), tiled on its (H, W) grid, and blend its
    outputs (B, out_channels, out_scale*h, out_scale*w per tile) into (B, out_channels, out_scale*H, out_scale*W).
    ``run`` takes lists of up to ``per_call`` tiles (all of one shape: they may run as one batch) and their boxes,
    and returns their outputs; ``done(n)`` is called after each call."""
    batch, _, height, width = x.shape
    height, width = height // in_scale, width // in_scale
    total = np.zeros((batch, out_channels, height * out_scale, width * out_scale), np.float32)
    weight = np.zeros((height * out_scale, width * out_scale), np.float32)
    rows, cols = tiling.spans(height), tiling.spans(width)
    for pieces, group in tile_groups(x, tiling, in_scale, per_call):
        outputs = run(pieces, group)
        for (r, c), out in zip(group, outputs):
            w = np.outer(ramp(r, rows, out_scale, margin), ramp(c, cols, out_scale, margin))  # (h, w) of the output
            area = (slice(r[0] * out_scale, r[1] * out_scale), slice(c[0] * out_scale, c[1] * out_scale))
            total[(slice(None), slice(None), *area)] += np.asarray(out, np.float32) * w
            weight[area] += w
        if done is not None:
            done(len(group))
    return total / weight


def tile_groups(x: np.ndarray, tiling: Tiling, in_scale: int,
                per_call: int = 1) -> Iterator[tuple[list[np.ndarray], list[Box]]]:
    """The tiles of ``x`` (B, C, in_scale*H, in_scale*W) on its (H, W) grid, up to ``per_call`` at a time: (their
    pieces of ``x``, their boxes)."""
    rows, cols = tiling.spans(x.shape[2] // in_scale), tiling.spans(x.shape[3] // in_scale)
    for group in _chunks([(r, c) for r in rows for c in cols], per_call):
        yield [x[:, :, r[0] * in_scale : r[1] * in_scale, c[0] * in_scale : c[1] * in_scale] for r, c in group], group


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + max(size, 1)]
