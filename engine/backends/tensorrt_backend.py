"""TensorRT backend: deserialises a bundle's engines and runs them on one CUDA stream; no torch.

Engine lifecycle: load (refusing engines built for another GPU or TensorRT version), allocate device
buffers for the current shapes (grown when a larger shape arrives), infer, and, for static-shape
bundles, capture each engine's launch once in a CUDA graph and replay it. A static bundle's UNet
engines hold one optimisation profile per row count (B to 3B); each profile used gets its own execution
context, buffers and graph, so guidance that drops branches still replays captured graphs.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from engine.backends import HostArrays
from engine.errors import InputError
from engine.manifest import Bundle, Manifest

log = logging.getLogger(__name__)


def current_gpu() -> dict:
    """{"name", "compute_capability"} of CUDA device 0, via cuda-python."""
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise InputError(f"no usable CUDA GPU for TensorRT ({err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def require_tensorrt() -> dict:
    """Fail early where TensorRT, cuda-python or a GPU is missing; returns the GPU."""
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        raise InputError("TensorRT needs the tensorrt and cuda-python packages: pip install '.[tensorrt]' "
                         "on a machine with an NVIDIA GPU") from None
    return current_gpu()


def check_engine_compatible(manifest: Manifest, tensorrt_version: str, gpu: dict) -> None:
    """Refuse engines built for another GPU, compute capability or TensorRT version."""
    built_gpu = manifest.gpu or {}
    built_trt = manifest.tools.get("tensorrt")
    problems = []
    if built_trt != tensorrt_version:
        problems.append(f"TensorRT {built_trt}, this is {tensorrt_version}")
    if built_gpu.get("name") != gpu["name"] or built_gpu.get("compute_capability") != gpu["compute_capability"]:
        problems.append(f"{built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), "
                        f"this is {gpu['name']} (sm {gpu['compute_capability']})")
    if problems:
        raise InputError("these engines were built for " + "; ".join(problems) +
                         ": rebuild them here with `ip2p export MODEL OUT --format tensorrt`")


def _check(result):
    """cuda-python returns (error, values...); raise on error, return the values."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def matching_profile(shapes: dict[str, tuple[int, ...]], profiles: list[dict[str, tuple]]) -> int:
    """Index of the first optimisation profile (input name -> (min, opt, max) shape) that admits ``shapes``."""
    for index, ranges in enumerate(profiles):
        if all(all(lo <= d <= hi for d, lo, hi in zip(shape, ranges[name][0], ranges[name][2]))
               for name, shape in shapes.items()):
            return index
    raise InputError(f"no optimisation profile of this engine admits inputs {shapes}; export a bundle covering them")


class ProfileContext:
    """An execution context bound to one optimisation profile, with its device buffers and CUDA graph."""

    def __init__(self, engine, index: int, stream):
        self.context = engine.create_execution_context()
        self.context.set_optimization_profile_async(index, stream)
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.uploaded: dict[str, tuple[np.ndarray, int]] = {}  # name -> (array last copied in, its buffer)
        self.graph = None

    def buffer(self, name: str, nbytes: int) -> int:
        from cuda.bindings import runtime as cudart

        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(cudart.cudaFree(ptr))
            ptr = _check(cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
            self.context.set_tensor_address(name, ptr)
            self.graph = None  # addresses changed: a captured graph is stale
        return ptr

    def close(self) -> None:
        from cuda.bindings import runtime as cudart

        for ptr, _ in self.buffers.values():
            cudart.cudaFree(ptr)
        self.buffers.clear()


class EngineRunner:
    """One deserialised engine and, per optimisation profile used (static bundles have one per UNet row
    count), an execution context with its buffers and (optionally) a CUDA graph."""

    def __init__(self, runtime, path, stream, use_graph: bool):
        import tensorrt as trt

        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise InputError(f"{path}: TensorRT cannot deserialise this engine; rebuild it")
        self.stream, self.use_graph = stream, use_graph
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profiles = [{n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, i)) for n in self.inputs}
                         for i in range(self.engine.num_optimization_profiles)]
        self._contexts: dict[int, ProfileContext] = {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as cudart

        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        index = matching_profile({n: tuple(inputs[n].shape) for n in self.inputs}, self.profiles)
        if index not in self._contexts:
            self._contexts[index] = ProfileContext(self.engine, index, self.stream)
        ctx = self._contexts[index]
        for name in self.inputs:
            given = inputs[name]
            array = np.ascontiguousarray(given, dtype=self.dtypes[name])
            ctx.context.set_input_shape(name, array.shape)
            ptr = ctx.buffer(name, array.nbytes)
            last, last_ptr = ctx.uploaded.get(name, (None, 0))
            if last is not given or last_ptr != ptr or given.flags.writeable:
                _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, self.stream))
            # a read-only array passed again (backend.constant: the text embeddings) is already there
            ctx.uploaded[name] = (given, ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(ctx.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self.dtypes[name])
            ctx.buffer(name, results[name].nbytes)
        self._launch(ctx)
        for name, array in results.items():
            _check(cudart.cudaMemcpyAsync(array.ctypes.data, ctx.buffers[name][0], array.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return {name: array.astype(np.float32, copy=False) for name, array in results.items()}

    def _launch(self, ctx: ProfileContext) -> None:
        from cuda.bindings import runtime as cudart

        if not self.use_graph:
            ctx.context.execute_async_v3(self.stream)
            return
        if ctx.graph is None:
            ctx.context.execute_async_v3(self.stream)  # one plain run first: TensorRT initialises lazily
            _check(cudart.cudaStreamSynchronize(self.stream))
            _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            ctx.context.execute_async_v3(self.stream)
            graph = _check(cudart.cudaStreamEndCapture(self.stream))
            ctx.graph = _check(cudart.cudaGraphInstantiate(graph, 0))
        _check(cudart.cudaGraphLaunch(ctx.graph, self.stream))

    def close(self) -> None:
        for ctx in self._contexts.values():
            ctx.close()
        self._contexts.clear()


class TensorRTBackend(HostArrays):
    """Runs each component's engine; arrays are numpy on the host, copied per call."""

    def __init__(self, bundle: Bundle, use_cuda_graph: bool):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self.bundle = bundle
        self.value_bytes = 2 if bundle.manifest.precision == "fp16" else 4
        self.stream = _check(cudart.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {
            name: EngineRunner(runtime, bundle.component_file(name), self.stream, use_cuda_graph)
            for name in bundle.manifest.components
        }

    def has(self, component: str) -> bool:
        return component in self._engines

    def macs(self, component: str) -> float:
        return self.bundle.unet_macs(component)

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        return self._engines[component].run(inputs)


def load(bundle: Bundle, device: str = "cuda", dtype: str | None = None, cuda_graph: bool | None = None) -> TensorRTBackend:
    """A TensorRTBackend; CUDA graphs default to on for static-shape bundles (and are refused otherwise)."""
    if bundle.format != "tensorrt":
        raise InputError(f"{bundle.folder}: a {bundle.format} bundle; run it with backend={bundle.format!r}")
    if not device.startswith("cuda"):
        raise InputError(f"the tensorrt backend runs on a CUDA device, not {device!r}")
    if dtype not in (None, "float16"):
        raise InputError(f"{bundle.folder}: TensorRT bundles are fp16, not {dtype}")
    import tensorrt as trt

    check_engine_compatible(bundle.manifest, trt.__version__, require_tensorrt())
    static = bundle.profile.static
    if cuda_graph and not static:
        raise InputError("CUDA graphs need a static-shape bundle: export with --static WxH --batch N")
    return TensorRTBackend(bundle, use_cuda_graph=static if cuda_graph is None else cuda_graph)
