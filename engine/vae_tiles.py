"""The VAE over a large picture in tiles, on any backend, with the whole picture's GroupNorm statistics.

A tile normalises over itself unless told otherwise, and the VAE's GroupNorms then differ from the whole
picture's by more than a seam (docs/highres.md). Where the backend has the tile networks (``engine.specs.vae_tile``:
every bundle exported since they exist, and the torch backend), a first pass over the tiles gathers each layer's
statistics from the cells each tile owns, and the next pass normalises every tile with the whole picture's;
otherwise the plain network runs per tile, with a warning.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from engine import tiling
from engine.backends import Backend
from engine.errors import NumericalError
from engine.specs import VAE_DECODER, VAE_ENCODER, ComponentSpec, component_spec

log = logging.getLogger(__name__)
STATISTICS_PASSES = 1  # passes that only gather statistics before the one whose pictures count


class TiledVae:
    """One VAE network (``spec``: the encoder or the decoder) run tile by tile on ``backend``, blended."""

    def __init__(self, backend: Backend, spec: ComponentSpec, norm_layers: int, groups: int,
                 run_whole: Callable[[Any], np.ndarray] | None = None):
        """``norm_layers``/``groups``: the network's GroupNorms (``ModelConfig.vae_norms``). ``run_whole``: how a
        plain call runs where the backend lacks the tile network (the decoder: with its float32 fallback)."""
        self.backend, self.spec, self.layers, self.groups = backend, spec, norm_layers, groups
        self.tile_spec = component_spec(spec.name + "_tile")
        self.shared = backend.has(self.tile_spec.name) and norm_layers > 0
        self.run_whole = run_whole or self._run_plain
        if not self.shared:
            log.warning("%s: no tile network (export the bundle again): tiles normalise over themselves, and differ "
                        "from the whole picture more (docs/highres.md)", spec.name)

    @property
    def passes(self) -> int:
        return 1 + STATISTICS_PASSES if self.shared else 1

    def __call__(self, x: np.ndarray, tiles: tiling.Tiling, in_scale: int, out_scale: int, per_call: int,
                 done: Callable[[int], None]) -> np.ndarray:
        """``x`` (B, C, in_scale*H, in_scale*W) -> the network's output over the whole grid, blended from tiles."""
        out_channels = self.spec.outputs[0].dims[1]
        rows, cols = tiles.spans(x.shape[2] // in_scale), tiles.spans(x.shape[3] // in_scale)
        stats, given = np.zeros((self.layers, len(x), self.groups, 2), np.float32), 0.0
        parts: list[np.ndarray] = []

        def run(pieces: list[np.ndarray], boxes: list[tiling.Box]) -> list[np.ndarray]:
            batch = np.concatenate(pieces)  # (k*B, C, h, w): tile-major
            if not self.shared:
                return np.split(self.run_whole(batch), len(pieces))
            owned = np.concatenate([np.broadcast_to(np.outer(tiling.owned(r, rows), tiling.owned(c, cols)),
                                                    (len(x), 1, r[1] - r[0], c[1] - c[0])) for r, c in boxes])
            out = self._run_tile(batch, np.tile(stats, (1, len(pieces), 1, 1)), owned, given)
            parts.extend(np.split(out["norm_parts"], len(pieces), axis=1))
            return np.split(out[self.spec.output_names[0]], len(pieces))

        for _ in range(self.passes - 1):  # statistics only: the tiles' pictures are not blended
            parts.clear()
            for pieces, boxes in tiling.tile_groups(x, tiles, in_scale, per_call):
                run(pieces, boxes)
                done(len(boxes))
            stats, given = tiling.combine_statistics(parts), 1.0
        return tiling.blend(run, x, tiles, in_scale, out_scale, out_channels, per_call, margin=tiles.overlap // 4,
                            done=done)

    def _run_plain(self, batch: np.ndarray) -> np.ndarray:
        be = self.backend
        out = be.run(self.spec.name, {self.spec.input_names[0]: be.asarray(batch)})
        return be.to_numpy(out[self.spec.output_names[0]])

    def _run_tile(self, batch: np.ndarray, stats: np.ndarray, owned: np.ndarray, given: float) -> dict[str, np.ndarray]:
        be = self.backend
        inputs = dict(zip(self.tile_spec.input_names,
                          (batch, stats, np.ascontiguousarray(owned, np.float32), np.array([given], np.float32))))
        out = be.run(self.tile_spec.name, {name: be.asarray(value) for name, value in inputs.items()})
        arrays = {name: be.to_numpy(value) for name, value in out.items()}
        if not all(np.isfinite(value).all() for value in arrays.values()):
            raise NumericalError(f"{self.tile_spec.name}: a tile came out with NaN or Inf")
        return arrays


def encoder(backend: Backend, norms: tuple[int, int, int]) -> TiledVae:
    return TiledVae(backend, VAE_ENCODER, norms[0], norms[2])


def decoder(backend: Backend, norms: tuple[int, int, int], decode: Callable[[Any], np.ndarray]) -> TiledVae:
    return TiledVae(backend, VAE_DECODER, norms[1], norms[2], run_whole=lambda batch: decode(backend.asarray(batch)))
