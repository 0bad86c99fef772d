"""The UNet rows of a denoising step: one row per (image, guidance branch) the plan asks for, their conditioning,
step caching's full or shallow call, and the work each image is charged.

``UNetRows`` holds everything of an edit's UNet calls that is not the sampler's (the conditioning of every image,
the cached deep feature, the counters): ``prepare`` makes a step's call, ``finish`` takes its outputs, so a loop
can run many edits' calls as one (``engine.denoising``). Array-agnostic through the backend's helpers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.backends import Backend
from engine.caching import FeatureCache, StepCache
from engine.guidance import COND, UNCOND, Groups
from engine.specs import UNET_GUIDED


@dataclass
class Call:
    """One edit's UNet call at one step: the component, its inputs by spec name (N rows), the (image, branch) of
    each row, the groups they came from, and whether it runs the whole UNet."""

    component: str
    inputs: dict[str, Any]
    rows: list[tuple[int, int]]
    groups: Groups
    full: bool


class UNetRows:
    """Runs the UNet over the rows ``groups`` asks for, each call's input built from the images' latents and
    their conditioning; counts each image's rows and their MACs in whole-UNet rows."""

    def __init__(self, backend: Backend, text: Any, null: Any, image_latents: Any, step_cache: StepCache,
                 scales: Any = None):
        """``scales``: (B, 2) (s_T, s_I) per image where the UNet is a distilled student's (``specs.UNET_GUIDED``),
        which takes them as its rows' ``guidance`` input; None for a plain UNet."""
        self.backend, self.step_cache, self.scales = backend, step_cache, scales
        self.text, self.null, self.image_latents = text, null, image_latents  # (B, 77, D), (1, 77, D), (B, 4, h, w)
        self.count = int(image_latents.shape[0])
        self.evaluations, self.work = [0] * self.count, [0.0] * self.count  # per image, over the whole edit
        self.calls = 0  # UNet calls so far: the step cache decides by it
        self._full, self._shallow = (UNET_GUIDED.name,) * 2 if scales is not None else step_cache.components
        self._shallow_cost = backend.macs(self._shallow) / backend.macs(self._full) if step_cache.on else 1.0
        self._features = FeatureCache(lambda parts: backend.concat(parts, 0))
        self._conditioning: dict[tuple, tuple[Any, Any]] = {}  # per grouping: (text rows, image latent rows)

    def prepare(self, x: Any, t: float, groups: Groups) -> Call:
        """The UNet call of ``x`` (B, 4, h, w) at timestep ``t`` that ``groups`` asks for, not run yet; one of no
        rows where every image is dropped (nothing runs it)."""
        if not any(branches for _, branches in groups):
            return Call(self._full, {}, [], groups, full=False)  # no rows: no call, no feature stored
        inputs, rows = self._inputs(x, t, groups)
        if self.step_cache.full(self.calls) or not self._features.covers(rows):
            return Call(self._full, inputs, rows, groups, full=True)
        inputs["deep_feature"] = self._features.take(rows)  # (N, C, h', w')
        return Call(self._shallow, inputs, rows, groups, full=False)

    def finish(self, call: Call, result: dict[str, Any]) -> list[dict[int, Any]]:
        """``call``'s outputs (the backend's ``result``) per group and branch; the images charged their rows."""
        if not call.rows:
            return [{} for _ in call.groups]
        if call.full and self.step_cache.on:
            self._features.store(call.rows, result["deep_feature"])  # (N, C, h', w')
        self.calls += 1
        return self._split(result["noise_pred"], call.groups, call.full)

    def _inputs(self, x: Any, t: float, groups: Groups) -> tuple[dict[str, Any], list[tuple[int, int]]]:
        """The UNet's inputs for ``groups``, branch-major per group, and the (image, branch) of each row."""
        be = self.backend
        text_rows, image_rows = self._rows_for(groups)
        xs, rows = [], []
        for indices, branches in groups:
            xs += [self._take(x, indices)] * len(branches)  # sliced once per group, not once per branch
            rows += [(i, k) for k in branches for i in indices]
        sample = be.concat([be.concat(xs, 0), image_rows], 1)  # (N, 8, h, w)
        timestep = be.asarray(np.full(sample.shape[0], t, dtype=np.float32))  # (N,)
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_rows}
        if self.scales is not None:
            inputs["guidance"] = self._take(self.scales, [i for i, _ in rows])  # (N, 2)
        return inputs, rows

    def _rows_for(self, groups: Groups) -> tuple[Any, Any]:
        """(N, 77, D) text and (N, 4, h, w) image latents of the rows ``groups`` asks for: the same objects every
        step they are asked for (a GPU backend uploads them once)."""
        key = tuple((tuple(indices), branches) for indices, branches in groups)
        if key not in self._conditioning:
            be, texts, images = self.backend, [], []
            for indices, branches in groups:
                for k in branches:
                    texts.append(self._take(self.text, indices) if k == COND else be.concat([self.null] * len(indices), 0))
                    latent = self._take(self.image_latents, indices)
                    images.append(latent * 0 if k == UNCOND else latent)
            self._conditioning[key] = (be.constant(be.concat(texts, 0)), be.concat(images, 0))
        return self._conditioning[key]

    def _take(self, array: Any, indices: list[int]) -> Any:
        """Rows ``indices`` of a (B, ...) array; the array itself when they are all of them in order."""
        if len(indices) == self.count:
            return array
        return self.backend.concat([array[i : i + 1] for i in indices], 0)

    def _split(self, out: Any, groups: Groups, full: bool) -> list[dict[int, Any]]:
        """The call's (N, 4, h, w) output cut back into groups and branches; each image charged its rows."""
        outputs, offset = [], 0
        for indices, branches in groups:
            group = {}
            for k in branches:
                group[k] = out[offset : offset + len(indices)]
                offset += len(indices)
            for i in indices:
                self.evaluations[i] += len(branches)
                self.work[i] += len(branches) * (1.0 if full else self._shallow_cost)
            outputs.append(group)
        return outputs
