"""The one denoising loop: a set of edits advanced one step at a time, their UNet rows run together.

An ``Edit`` is one edit's whole denoising state: its sampler (a generator, ``engine.samplers``) with its history
and schedule, its noise, its guidance plan (``engine.guidance.GuidedStep``) and its UNet rows with their
conditioning and step-cache features (``engine.rows.UNetRows``). ``DenoisingLoop.step`` asks every edit for the
rows it needs at its own step and sigma, runs the rows of all of them that use the same network as one call
(per-row timesteps), and advances each edit's sampler with its own outputs. ``EditPipeline.run`` runs it for a
fixed set (one edit); the server adds edits between steps and takes them out as they finish.

A row's output does not depend on the rows it shares a call with, so every edit gets the samples it would get
alone (bit for bit where the backend's kernels do not change with the batch size).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from engine.backends import Backend
from engine.guidance import GuidancePlan, GuidedStep
from engine.rows import Call, UNetRows
from engine.samplers import Steps

log = logging.getLogger(__name__)

RowLimits = tuple[int, int]  # (min, max) UNet rows one call takes: a bundle's profile; (1, None) for any


class Edit:
    """One edit (one image, or a batch of images with one config) in the loop: the sampler's ``steps``, the
    ``guided`` step with its plan, the ``rows`` of its UNet calls. ``owner`` is whatever its caller keeps with it
    (the pipeline: what it needs to decode it). ``sample`` is the final sample at the DDPM scale the VAE expects,
    once ``finished``."""

    def __init__(self, steps: Steps, guided: GuidedStep, rows: UNetRows, sigmas, owner: Any = None):
        self.guided, self.rows, self.owner = guided, rows, owner
        self.total = len(sigmas) - 1  # steps in all
        self.done = 0  # steps done
        self.sample: Any = None
        self._steps = steps
        self._final_scale = 1.0 / (float(sigmas[-1]) ** 2 + 1) ** 0.5
        self._x, self._sigma = next(steps)
        self._call: Call | None = None

    @property
    def finished(self) -> bool:
        return self.done == self.total

    @property
    def plan(self) -> GuidancePlan:
        return self.guided.plan

    def prepare(self) -> Call:
        """This step's UNet call (not run): the rows the plan wants at the sampler's current sigma."""
        scaled, t, groups = self.guided.request(self._x, self._sigma)
        self._call = self.rows.prepare(scaled, t, groups)
        return self._call

    def advance(self, result: dict[str, Any]) -> None:
        """Take this step's UNet outputs (``result``: the backend's, for this edit's rows only) and step the sampler."""
        call, self._call = self._call, None
        outputs = self.rows.finish(call, result)
        denoised = self.guided.denoised(self._x, self._sigma, call.groups, outputs)
        self.done += 1
        try:
            self._x, self._sigma = self._steps.send(denoised)
        except StopIteration as end:
            self.sample = end.value * self._final_scale


class DenoisingLoop:
    """Advances a changing set of edits one step at a time. Each step makes one UNet call per network in use
    (the whole UNet, or a step cache's shallow part) over the rows of every edit, split and padded to the
    ``limits`` of rows a call takes, and split to the rows ``rows_within(h * w)`` allows at the latents' size (a
    memory bound: full-size pictures); ``on_call(rows, padded)`` is told each call's real and padding rows."""

    def __init__(self, backend: Backend, limits: RowLimits = (1, None),
                 on_call: Callable[[int, int], None] | None = None,
                 rows_within: Callable[[int], int] | None = None):
        self.backend, self.limits, self.on_call, self.rows_within = backend, limits, on_call, rows_within
        self.edits: list[Edit] = []

    def __len__(self) -> int:
        return len(self.edits)

    def add(self, edit: Edit) -> None:
        self.edits.append(edit)

    def remove(self, edit: Edit) -> None:
        """Take an edit out (cancelled): it costs no rows from the next step on."""
        self.edits.remove(edit)

    def rows(self) -> int:
        """The most UNet rows a step of the set can ask for (each edit's exact rows; approximate policies only
        ever ask for fewer)."""
        return sum(edit.plan.most_rows() for edit in self.edits)

    def step(self) -> list[Edit]:
        """One step of every edit; the edits that finished (taken out of the set)."""
        calls = [(edit, edit.prepare()) for edit in self.edits]
        by_network: dict[str, list[tuple[Edit, Call]]] = {}
        for edit, call in calls:
            if call.rows:
                by_network.setdefault(call.component, []).append((edit, call))
        results: dict[int, dict[str, Any]] = {}
        for component, members in by_network.items():
            results.update(zip((id(edit) for edit, _ in members), self._run(component, [c for _, c in members])))
        for edit, _ in calls:
            edit.advance(results.get(id(edit), {}))
        finished = [edit for edit in self.edits if edit.finished]
        self.edits = [edit for edit in self.edits if not edit.finished]
        return finished

    def _run(self, component: str, calls: list[Call]) -> list[dict[str, Any]]:
        """Run ``calls`` of one network as calls of the rows the limits allow; each call's outputs, cut back."""
        be = self.backend
        counts = [len(call.rows) for call in calls]
        total = sum(counts)
        lo, hi = self.limits
        if self.rows_within is not None:
            height, width = calls[0].inputs["sample"].shape[-2:]
            hi = max(lo, min(hi or total, self.rows_within(height * width)))
        if len(calls) == 1 and lo <= total and (hi is None or total <= hi):
            self._told(total, 0)
            return [be.run(component, calls[0].inputs)]  # the common case: as it is, nothing copied
        names = list(calls[0].inputs)
        joined = {name: be.concat([call.inputs[name] for call in calls], 0) for name in names}
        size = total if hi is None else hi
        parts: dict[str, list[Any]] = {}
        for start in range(0, total, size):
            chunk = {name: value[start : start + size] for name, value in joined.items()}
            rows = min(size, total - start)
            padding = max(0, lo - rows)
            if padding:  # a static profile: fill the call with copies of its last row, their outputs dropped
                chunk = {name: be.concat([value] + [value[-1:]] * padding, 0) for name, value in chunk.items()}
            self._told(rows, padding)
            for name, value in be.run(component, chunk).items():
                parts.setdefault(name, []).append(value[:rows])
        outputs = {name: values[0] if len(values) == 1 else be.concat(values, 0) for name, values in parts.items()}
        answers, offset = [], 0
        for count in counts:
            answers.append({name: value[offset : offset + count] for name, value in outputs.items()})
            offset += count
        return answers

    def _told(self, rows: int, padded: int) -> None:
        if self.on_call is not None:
            self.on_call(rows, padded)
