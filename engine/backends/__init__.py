"""Backends run the networks named in ``engine.specs``; everything else is shared.

A backend answers ``run(component, inputs) -> outputs`` keyed by the spec's tensor names, plus the
array helpers the denoising loop needs: ``asarray`` (numpy -> backend array), ``to_numpy``, ``concat``
and ``constant`` (an input that every step passes again unchanged, which a GPU backend keeps on the
device), ``macs`` (the multiply-accumulates of one UNet row of a component at the model's own size, which weigh
the work of step caching's shallow calls: their share changes little with size), and ``value_bytes`` (the bytes of one activation value in the dtype its networks
compute in, which sizes the VAE's memory budget). Each backend lives in its own module so its heavy imports stay there.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from engine.errors import InputError

BACKENDS = {
    "torch": "engine.backends.torch_backend",  # runs model folders and single files
    "onnxruntime": "engine.backends.onnxruntime_backend",  # runs exported ONNX bundles
    "openvino": "engine.backends.openvino_backend",  # runs exported ONNX bundles on the CPU
    "tensorrt": "engine.backends.tensorrt_backend",  # runs exported TensorRT bundles
}
BUNDLE_BACKENDS = ("onnxruntime", "openvino", "tensorrt")


class Backend(Protocol):
    value_bytes: int

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]: ...

    def has(self, component: str) -> bool: ...

    def asarray(self, array: np.ndarray) -> Any: ...

    def to_numpy(self, array: Any) -> np.ndarray: ...

    def concat(self, arrays: Sequence[Any], axis: int) -> Any: ...

    def constant(self, array: Any) -> Any: ...

    def macs(self, component: str) -> float: ...


def backend_module(name: str):
    """The module implementing backend ``name``; imported only when asked for."""
    from engine.extras import import_extra

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return import_extra(BACKENDS[name], f"the {name} backend")


class HostArrays:
    """Array helpers for backends whose arrays are numpy on the host (ONNX Runtime, TensorRT)."""

    def asarray(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def concat(self, arrays: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(arrays, axis=axis)

    def constant(self, array: np.ndarray) -> np.ndarray:
        """A read-only view (no copy): passed again as the same object, it is known unchanged and not
        re-uploaded."""
        view = np.asarray(array).view()
        view.flags.writeable = False
        return view


def bundle_runtime(bundle_format: str, device: str) -> tuple[str, str]:
    """(the backend that runs a bundle of ``bundle_format`` on ``device`` when none is named, why). The rule,
    confirmed by ``benchmarks/cpu_limit.py`` (docs/export.md): on a CPU, OpenVINO where it is installed (a 3-row
    sd15 UNet call at 512x512 1.98x faster than onnxruntime on the same file in bfloat16, 1.05x in float32),
    else onnxruntime; on a GPU, onnxruntime (its CUDA and TensorRT providers); a TensorRT bundle, TensorRT."""
    from engine.extras import available

    if bundle_format == "tensorrt":
        return "tensorrt", "a TensorRT bundle"
    if bundle_format == "openvino":
        return "openvino", "an int8 bundle for OpenVINO (ip2p quantize)"
    if device == "cpu" and available("openvino"):
        return "openvino", "the fastest exact runtime installed for ONNX on a CPU"
    if device == "cpu":
        return "onnxruntime", "OpenVINO is not installed (pip install 'ip2p-engine[openvino]': faster on CPUs)"
    return "onnxruntime", f"ONNX on {device}"
