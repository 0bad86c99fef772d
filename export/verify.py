"""Exported components against PyTorch on fresh random inputs: max absolute and relative error."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.specs import ComponentSpec

log = logging.getLogger(__name__)

# Relative error = max |onnx - torch| / max |torch|; an export over these fails.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass(frozen=True)
class Check:
    component: str
    shapes: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_rel <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else f"FAILED (> {self.tolerance:g})"
        return f"{self.component:13s} {self.shapes:36s} max abs {self.max_abs:.2e}  rel {self.max_rel:.2e}  {verdict}"


Ranges = tuple[tuple[float, float], tuple[float, float]]  # a student's trained (s_T, s_I) ranges
UNTRAINED_RANGES: Ranges = ((1.0, 8.0), (1.0, 8.0))


def random_inputs(spec: ComponentSpec, sizes: dict[str, int], vocab_size: int, seed: int,
                  guidance: Ranges = UNTRAINED_RANGES) -> dict[str, np.ndarray]:
    """Inputs for ``spec`` with symbolic dims set by ``sizes``: token ids, timesteps in [0, 1000), a student's
    guidance scales within the ranges it was trained over (``guidance``: outside them its activations, and float16's
    error, grow), 0/1 flags, positive variances, else N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for tensor in spec.inputs:
        shape = tuple(d if isinstance(d, int) else sizes[d] for d in tensor.dims)
        if tensor.dtype == "int64":
            out[tensor.name] = rng.integers(0, vocab_size, shape, dtype=np.int64)
        elif tensor.name == "timestep":
            out[tensor.name] = rng.uniform(0, 999, shape).astype(np.float32)
        elif tensor.name == "guidance":  # a student's (s_T, s_I)
            out[tensor.name] = np.stack([rng.uniform(lo, hi, shape[:-1]) for lo, hi in guidance], -1).astype(np.float32)
        elif tensor.name in ("owned", "given_stats"):  # 0/1 flags
            out[tensor.name] = rng.integers(0, 2, shape).astype(np.float32)
        elif tensor.name == "norm_stats":  # means, and variances that are positive
            out[tensor.name] = np.stack([rng.standard_normal(shape[:-1]), rng.uniform(0.5, 2.0, shape[:-1])],
                                        -1).astype(np.float32)
        else:
            out[tensor.name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def compare(module: torch.nn.Module, session, inputs: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|) of an ONNX Runtime session against ``module``, the
    worst over the outputs."""
    with torch.no_grad():
        refs = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    refs = refs if isinstance(refs, tuple) else (refs,)
    errors = []
    for ref, out in zip(refs, session.run(None, inputs)):
        ref, out = ref.float().numpy(), out.astype(np.float32)
        err = float(np.abs(out - ref).max()) if np.isfinite(out).all() else float("inf")
        rel = err / max(float(np.abs(ref).max()), 1e-12)
        errors.append((err, rel if rel == rel else float("inf")))  # NaN (a NaN reference) counts as the worst
    return max(errors, key=lambda e: (e[1], e[0]))


def verify_component(
    name: str,
    module: torch.nn.Module,
    spec: ComponentSpec,
    onnx_path: Path,
    size_sets: list[dict[str, int]],
    precision: str,
    vocab_size: int,
    guidance: Ranges = UNTRAINED_RANGES,
) -> list[Check]:
    """Run ``onnx_path`` and ``module`` (float32) on random inputs at each set of sizes (a student's scales within
    ``guidance``, its trained ranges)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    checks = []
    for i, sizes in enumerate(size_sets):
        inputs = random_inputs(spec, sizes, vocab_size, seed=1000 + i, guidance=guidance)
        max_abs, max_rel = compare(module, session, inputs)
        shapes = " ".join(f"{t.name}{list(v.shape)}" for t, v in zip(spec.inputs, inputs.values()) if v.ndim > 2)
        checks.append(Check(name, shapes, max_abs, max_rel, TOLERANCE[precision]))
    return checks
