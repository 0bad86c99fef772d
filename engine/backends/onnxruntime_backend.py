"""ONNX Runtime backend: runs an exported bundle's graphs; numpy in, numpy out, no torch.

Providers are picked once (TensorRT EP, then CUDA EP, then CPU, or as given), sessions are created
once and reused across edits.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence


from engine.backends import HostArrays
from engine.errors import InputError
from engine.manifest import Bundle

log = logging.getLogger(__name__)

PREFERENCE = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads share a core's FPUs; ORT runs best on one
    thread per core)."""
    try:
        cores = set()
        physical = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((physical, core))
        count = len(cores)
    except OSError:
        count = 0
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(count or available, available))


def choose_providers(device: str, available: Sequence[str], requested: Sequence[str] | None = None) -> list:
    """Execution providers for ``device``: the requested ones (checked), else the best available."""
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise InputError(f"execution provider(s) {', '.join(missing)} not available; have {', '.join(available)}")
        names = list(requested)
    elif device == "cpu":
        names = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        names = [p for p in PREFERENCE if p in available]
        if names == ["CPUExecutionProvider"]:
            raise InputError(f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
                             "(install the gpu extra: onnxruntime-gpu)")
    else:
        raise InputError(f"the onnxruntime backend runs on 'cpu' or 'cuda[:N]', not {device!r}")
    device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    chosen: list = []
    for name in names:
        if name == "CUDAExecutionProvider":
            chosen.append((name, {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}))
        elif name == "TensorrtExecutionProvider":
            chosen.append((name, {"device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True}))
        else:
            chosen.append(name)
    return chosen


class OnnxRuntimeBackend(HostArrays):
    """One InferenceSession per component, created once."""

    def __init__(self, bundle: Bundle, providers: list, threads: int | None = None):
        import onnxruntime as ort

        self.bundle = bundle
        self.profile = bundle.profile
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or physical_cores()
        options.enable_mem_pattern = False  # shapes vary between edits; patterns would be re-planned each time
        options.log_severity_level = 3
        self.on_gpu = any((p[0] if isinstance(p, tuple) else p) != "CPUExecutionProvider" for p in providers)
        self._sessions = {}
        for name in bundle.manifest["components"]:
            path = bundle.component_file(name)
            try:
                self._sessions[name] = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as err:  # ORT raises its own exception types for unreadable graphs
                raise InputError(f"{path}: onnxruntime cannot load this graph ({str(err).splitlines()[0]})") from None
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self._sessions.items()}
        log.debug("onnxruntime providers: %s", self._sessions["unet"].get_providers())

    def has(self, component: str) -> bool:
        return component in self._sessions

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        session = self._sessions[component]
        outputs = session.run(self._outputs[component], inputs)
        return dict(zip(self._outputs[component], outputs))


def load(bundle: Bundle, device: str = "cpu", dtype: str | None = None, providers: Sequence[str] | None = None,
         threads: int | None = None) -> OnnxRuntimeBackend:
    """An OnnxRuntimeBackend for an ONNX bundle. ``dtype``, if given, must match the bundle's precision."""
    import onnxruntime as ort

    if bundle.format != "onnx":
        raise InputError(f"{bundle.folder}: a {bundle.format} bundle; run it with backend={bundle.format!r}")
    _check_dtype(bundle, dtype)
    return OnnxRuntimeBackend(bundle, choose_providers(device, ort.get_available_providers(), providers), threads)


def _check_dtype(bundle: Bundle, dtype: str | None) -> None:
    precision = {"float32": "fp32", "float16": "fp16"}.get(dtype or "", dtype)
    if dtype is not None and precision != bundle.manifest["precision"]:
        raise InputError(f"{bundle.folder}: this bundle is {bundle.manifest['precision']}, not {dtype}; "
                         f"export another with --precision {precision}")
