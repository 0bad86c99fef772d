"""ONNX Runtime backend: runs an exported bundle's graphs; numpy in, numpy out, no torch.

Providers are picked once (TensorRT EP where TensorRT loads, then CUDA EP, then CPU, or as given),
sessions are created once and reused across edits.

On CPU, ``session.run`` reads the numpy inputs in place (no copies). On a GPU, sessions run through IO
binding (``BoundSession``): every input has a device buffer that persists while its shape does, so a
step copies only the new values into it; the text embeddings, the largest UNet input, are copied once
per edit and then skipped while they are unchanged. Outputs are written into persistent device
buffers. Because the bound addresses never change, ``cuda_graph=True`` (static-shape bundles) lets
ORT's CUDA provider capture each session's kernels once per input signature (the UNet: once per row count
the guidance asks for) and replay them.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from engine.backends import HostArrays
from engine.backends.attention_fusion import fuse_attention, read_graph
from engine.cpu import default_threads
from engine.errors import InputError, quote_error
from engine.manifest import Bundle
from engine.specs import VAE_DECODER, VAE_DECODER_FP32, VAE_DECODER_TILE, VAE_ENCODER, VAE_ENCODER_TILE

log = logging.getLogger(__name__)

PREFERENCE = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
VAE_COMPONENTS = {VAE_ENCODER.name, VAE_DECODER.name, VAE_ENCODER_TILE.name, VAE_DECODER_TILE.name, VAE_DECODER_FP32}
TENSORRT_LIBRARY = "libnvinfer.so.10"  # what onnxruntime-gpu's TensorRT provider links against


def tensorrt_loadable(library: str = TENSORRT_LIBRARY) -> bool:
    """Whether TensorRT's runtime library loads here. onnxruntime-gpu lists its TensorRT provider whether
    or not TensorRT is installed; chosen without it, session creation fails over to a default provider list
    and drops our CUDA options."""
    try:
        import tensorrt  # noqa: F401  (the pip package loads its libraries from its own folder)
    except ImportError:
        pass
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def usable_providers(available: Sequence[str], tensorrt_loads: Callable[[], bool] = tensorrt_loadable) -> list[str]:
    """onnxruntime's available providers, less the TensorRT one where TensorRT itself cannot load."""
    if "TensorrtExecutionProvider" in available and not tensorrt_loads():
        return [p for p in available if p != "TensorrtExecutionProvider"]
    return list(available)


def choose_providers(device: str, available: Sequence[str], requested: Sequence[str] | None = None,
                     cuda_graph: bool = False) -> list:
    """Execution providers for ``device``: the requested ones (checked), else the best available.
    ``cuda_graph`` turns on the CUDA (or TensorRT) provider's graph capture."""
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
            options = {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}
            chosen.append((name, {**options, "enable_cuda_graph": "1"} if cuda_graph else options))
        elif name == "TensorrtExecutionProvider":
            options = {"device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True}
            chosen.append((name, {**options, "trt_cuda_graph_enable": True} if cuda_graph else options))
        else:
            chosen.append(name)
    return chosen


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


class BoundSession:
    """One session run through IO binding with persistent buffers on ``device`` ("cpu" or "cuda").

    Inputs: a buffer per input, made for the first call of a signature (the inputs' shapes and dtypes) and
    reused while calls keep it; a call copies the new values into it in place, or nothing when the caller
    passes the very array it passed last time (a read-only array, such as the text embeddings of an edit).
    Outputs: the buffers ORT allocated on the first call, bound for every later one. So the addresses stay
    fixed for a signature, as CUDA graph replay requires. Without ``graphs`` only the latest signature's
    binding is kept. With ``graphs`` (CUDA graphs) every signature keeps its own binding and runs under its
    own ``gpu_graph_id``: ORT captures one graph per signature (a static bundle's UNet, one per row count
    the guidance asks for) and replays each on its own buffers.
    """

    def __init__(self, session, device: str, device_id: int = 0, graphs: bool = False):
        import onnxruntime as ort

        self._ort, self.session, self.device, self.device_id = ort, session, device, device_id
        self.graphs = graphs
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._bindings: dict[tuple, _Binding] = {}  # by signature; the latest one only, unless ``graphs``
        self.copies = 0  # input copies made, for tests and logs

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        arrays = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        signature = tuple((name, a.shape, a.dtype.str) for name, a in arrays.items())
        bound = self._bindings.get(signature)
        if bound is None:  # new shapes: new buffers, bound once
            if not self.graphs:
                self._bindings.clear()
            bound = self._bindings[signature] = self._bind(arrays, graph_id=len(self._bindings) + 1)
        for name, array in arrays.items():
            if bound.last.get(name) is not array:
                bound.inputs[name].update_inplace(array)
                self.copies += 1
        bound.last = {name: a for name, a in arrays.items() if not a.flags.writeable}
        self.session.run_with_iobinding(bound.binding, bound.run_options)
        if not bound.outputs_kept:  # keep the buffers ORT just allocated for the outputs
            outputs = bound.binding.get_outputs()
            bound.binding.clear_binding_outputs()
            for name, value in zip(self.output_names, outputs):
                bound.binding.bind_ortvalue_output(name, value)
            bound.outputs_kept = True
        return dict(zip(self.output_names, bound.binding.copy_outputs_to_cpu()))

    @property
    def signatures(self) -> list[tuple]:
        """The input signatures with a binding (and, with ``graphs``, a graph) kept."""
        return list(self._bindings)

    def buffers(self, signature: tuple | None = None) -> list[int]:
        """Addresses of the input buffers of ``signature`` (default: the latest)."""
        bound = self._bindings[signature] if signature is not None else list(self._bindings.values())[-1]
        return [value.data_ptr() for value in bound.inputs.values()]

    def _bind(self, arrays: dict[str, np.ndarray], graph_id: int) -> "_Binding":
        binding = self.session.io_binding()
        inputs = {}
        for name, array in arrays.items():  # owned buffers (on CPU, from_numpy would wrap the caller's array)
            inputs[name] = self._ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, self.device,
                                                                            self.device_id)
            binding.bind_ortvalue_input(name, inputs[name])
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        run_options = None
        if self.graphs:
            run_options = self._ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))  # ORT's CUDA graph annotation, >= 1
        return _Binding(binding, inputs, run_options)


@dataclass
class _Binding:
    """One signature's IO binding: its input buffers, the read-only arrays last copied in, its run options."""

    binding: Any
    inputs: dict[str, Any]
    run_options: Any
    last: dict[str, np.ndarray] = field(default_factory=dict)
    outputs_kept: bool = False


class OnnxRuntimeBackend(HostArrays):
    """One InferenceSession per component, created once; run directly on CPU, through ``BoundSession`` on
    a GPU (or wherever ``io_binding`` asks for it)."""

    def __init__(self, bundle: Bundle, providers: list, threads: int | None = None, io_binding: bool | None = None,
                 cuda_graph: bool = False, spin: bool | None = None, spin_after_run: bool | None = None,
                 fused_attention: bool = True):
        import onnxruntime as ort

        self.bundle = bundle
        self.value_bytes = 2 if bundle.manifest.precision == "fp16" else 4
        self._ort, self._threads, self._spin, self._spin_after_run = ort, threads, spin, spin_after_run
        gpu = [p for p in providers if _provider_name(p) != "CPUExecutionProvider"]
        self.on_gpu = bool(gpu)
        device_id = gpu[0][1].get("device_id", 0) if gpu and isinstance(gpu[0], tuple) else 0
        # TensorRT's provider takes no com.microsoft op: the graphs stay as exported there
        fuse = fused_attention and not any(_provider_name(p) == "TensorrtExecutionProvider" for p in providers)
        self.fused: dict[str, int] = {}  # attention chains run by the fused kernel, per component
        self._sessions = {name: self._session(name, providers, fuse) for name in bundle.manifest.components}
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self._sessions.items()}
        self.bound: dict[str, BoundSession] = {}
        if self.on_gpu if io_binding is None else io_binding:
            device = "cuda" if self.on_gpu else "cpu"
            self.bound = {name: BoundSession(s, device, device_id, cuda_graph) for name, s in self._sessions.items()}
        log.debug("onnxruntime providers: %s, io binding: %s", next(iter(self._sessions.values())).get_providers(),
                  bool(self.bound))

    def _options(self, name: str):
        ort = self._ort
        options = ort.SessionOptions()
        # the VAE's sessions allocate from the system, not from onnxruntime's arena, which keeps (and on a CPU
        # grows in powers of two) what its largest call held: a 704-px decoder tile of SD 1.5 went past 15 GiB
        options.enable_cpu_mem_arena = name not in VAE_COMPONENTS
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self._threads or default_threads()
        options.enable_mem_pattern = False  # shapes vary between edits; patterns would be re-planned each time
        options.log_severity_level = 3
        if self._spin is not None:  # ORT's CPU threads busy-wait for work between calls unless told not to
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        if self._spin_after_run is not None:  # off: threads spin within a run, and stop as soon as it returns
            options.add_session_config_entry("session.force_spinning_stop", "0" if self._spin_after_run else "1")
        return options

    def _session(self, name: str, providers: list, fuse: bool):
        """The session of component ``name``; with ``fuse``, its attention chains swapped for onnxruntime's
        blocked kernel first (``attention_fusion``), the graph handed over in memory and its weights read
        from their side file beside it."""
        path, options = self.bundle.component_file(name), self._options(name)
        model: str | bytes = str(path)
        try:
            if fuse:
                graph = read_graph(path)
                self.fused[name] = fuse_attention(graph, upcast=not self.on_gpu)
                if self.fused[name]:
                    model = graph.SerializeToString()
                    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                     str(path.parent))
                    log.debug("%s: %d attention chains fused", name, self.fused[name])
            return self._ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as err:  # ORT raises its own exception types for unreadable graphs
            raise InputError(f"{path}: onnxruntime cannot load this graph ({quote_error(err)})") from None

    def has(self, component: str) -> bool:
        return component in self._sessions

    def macs(self, component: str) -> float:
        return self.bundle.unet_macs(component)

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.bound:
            return self.bound[component].run(inputs)
        session = self._sessions[component]
        outputs = session.run(self._outputs[component], inputs)
        return dict(zip(self._outputs[component], outputs))


def load(bundle: Bundle, device: str = "cpu", dtype: str | None = None, providers: Sequence[str] | None = None,
         threads: int | None = None, io_binding: bool | None = None, cuda_graph: bool = False,
         spin: bool | None = None, spin_after_run: bool | None = None, fused_attention: bool = True) -> OnnxRuntimeBackend:
    """An OnnxRuntimeBackend for an ONNX bundle. ``dtype``, if given, must match the bundle's precision.
    ``io_binding`` defaults to on for GPUs; ``cuda_graph`` needs a GPU and a static-shape bundle. ``spin``:
    whether idle CPU threads busy-wait (ORT's default, on); off leaves the cores to a server's other threads.
    ``spin_after_run`` off keeps the busy-waiting inside each run and stops it when the run returns.
    ``fused_attention`` (on): attention runs in onnxruntime's blocked kernel, never holding the whole score
    matrix; off runs the graphs as exported (the matrix held: gigabytes at full-size pictures)."""
    import onnxruntime as ort

    if bundle.format != "onnx":
        raise InputError(f"{bundle.folder}: a {bundle.format} bundle; run it with backend={bundle.format!r}")
    _check_dtype(bundle, dtype)
    if cuda_graph and not device.startswith("cuda"):
        raise InputError(f"CUDA graphs run on a CUDA device, not {device!r}")
    if cuda_graph and not bundle.profile.static:
        raise InputError("CUDA graphs need a static-shape bundle: export with --static WxH --batch N")
    if cuda_graph and io_binding is False:
        raise InputError("CUDA graphs need io_binding (fixed device buffers)")
    available = ort.get_available_providers()
    chosen = choose_providers(device, available if providers else usable_providers(available), providers, cuda_graph)
    if device.startswith("cuda") and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from pip's nvidia-* packages, where no system CUDA is installed
    return OnnxRuntimeBackend(bundle, chosen, threads, io_binding, cuda_graph, spin, spin_after_run, fused_attention)


def _check_dtype(bundle: Bundle, dtype: str | None) -> None:
    precision = {"float32": "fp32", "float16": "fp16"}.get(dtype or "", dtype)
    if dtype is not None and precision != bundle.manifest.precision:
        raise InputError(f"{bundle.folder}: this bundle is {bundle.manifest.precision}, not {dtype}; "
                         f"export another with --precision {precision}")
