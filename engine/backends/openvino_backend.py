"""OpenVINO backend: runs an exported ONNX bundle's graphs with OpenVINO's CPU plugin; numpy in, numpy out, no
torch.

Each component is compiled once from the bundle's own ``.onnx`` file (OpenVINO reads ONNX directly), in
bfloat16 where the CPU computes it natively (``engine.cpu``) and float32 elsewhere, with dynamic shapes: every
row count (1, 2 or 3 UNet rows per image) and size of the bundle's profile runs on the one compiled network.
A bundle written by ``ip2p quantize`` holds its UNet as an int8 OpenVINO IR instead,
compiled the same way (its quantized layers run in int8, the rest in the precision above). Compiled networks
are kept in OpenVINO's model cache (``cache_dir``), so a second process loads them instead of compiling
again. In bfloat16 the VAE decoder is also compiled in float32, as the fallback the pipeline
takes when a reduced-precision decode overflows.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.backends import HostArrays
from engine.cpu import default_threads, native_dtype
from engine.errors import InputError, quote_error
from engine.manifest import Bundle
from engine.specs import VAE_DECODER, VAE_DECODER_FP32, component_spec

log = logging.getLogger(__name__)

PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}  # the dtypes this backend computes in, OpenVINO's names
FORMATS = ("onnx", "openvino")  # bundles of ONNX graphs; "openvino": its UNet an int8 IR (``ip2p quantize``)


def default_cache_dir() -> Path:
    """Where compiled networks are kept: $IP2P_CACHE/openvino, else the user's cache folder."""
    root = os.environ.get("IP2P_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                        os.path.expanduser("~/.cache"), "ip2p")
    return Path(root) / "openvino"


def ov_version() -> str:
    """OpenVINO's release, e.g. 2026.4.1."""
    import openvino as ov

    return ov.get_version().split("-")[0]


def choose_precision(dtype: str | None, flags: frozenset[str] | None = None) -> str:
    """The dtype to compute in: bfloat16 where this CPU has it natively, else float32; an asked-for dtype is
    checked (InputError naming the fix for one this CPU only emulates or this backend does not run)."""
    if dtype is None:
        return "bfloat16" if native_dtype("bfloat16", flags) else "float32"
    if dtype not in PRECISIONS:
        raise InputError(f"the openvino backend computes in {' or '.join(PRECISIONS)}, not {dtype!r}")
    if not native_dtype(dtype, flags):
        raise InputError(f"{dtype} is emulated on this CPU (no AVX-512 BF16 or AMX): run the openvino backend in "
                         "float32 (--dtype float32), or leave --dtype out")
    return dtype


class OpenVinoBackend(HostArrays):
    """One compiled network and one infer request per component, made once."""

    def __init__(self, bundle: Bundle, precision: str, threads: int, cache_dir: Path | None):
        import openvino as ov

        self.bundle, self.precision, self.threads = bundle, precision, threads
        self.value_bytes = 4 if precision == "float32" else 2
        core = ov.Core()
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self.compiled: dict[str, Any] = {}  # ov.CompiledModel by component
        self._requests: dict[str, Any] = {}
        self._outputs: dict[str, list[str]] = {}
        for name in bundle.manifest.components:
            self._compile(core, name, name, precision, threads)
        if precision != "float32" and VAE_DECODER_FP32 not in self._requests:
            self._compile(core, VAE_DECODER_FP32, VAE_DECODER.name, "float32", threads)
        log.info("openvino %s: %s in %s, %d threads", ov_version(), ", ".join(self._requests),
                 precision, threads)

    def _compile(self, core, name: str, component: str, precision: str, threads: int) -> None:
        path = self.bundle.component_file(component)
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)}
        try:
            compiled = core.compile_model(str(path), "CPU", config)  # from the file: the cache keys on it
        except Exception as err:  # OpenVINO raises RuntimeError with multi-line C++ context for unreadable graphs
            fix = (f"quantize it again with this OpenVINO ({ov_version()}): `ip2p quantize`" if path.suffix == ".xml"
                   else "export the bundle again with `ip2p export`, or run it with --backend onnxruntime")
            raise InputError(f"{path}: OpenVINO cannot read this graph ({quote_error(err)}); {fix}") from None
        self.compiled[name], self._requests[name] = compiled, compiled.create_infer_request()
        wanted = component_spec(component).output_names  # a port has several names (ONNX's, and its casts')
        self._outputs[name] = [next(n for n in port.get_names() if n in wanted) for port in compiled.outputs]

    def has(self, component: str) -> bool:
        return component in self._requests

    def macs(self, component: str) -> float:
        return self.bundle.unet_macs(component)

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        request = self._requests[component]
        arrays = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        results = request.infer(arrays, share_inputs=True)  # outputs copied out: the next call reuses its buffers
        return {name: results[name] for name in self._outputs[component]}


def load(bundle: Bundle, device: str = "cpu", dtype: str | None = None, threads: int | None = None,
         cache_dir: str | os.PathLike | None = None) -> OpenVinoBackend:
    """An OpenVinoBackend for an ONNX bundle on the CPU. ``dtype``: ``bfloat16`` (the default where the CPU has
    it natively) or ``float32``; the bundle's own precision only sets its weights (an int8 UNet stays int8). ``threads``: $OMP_NUM_THREADS
    where set, else one per physical core. ``cache_dir``: OpenVINO's model cache (default
    ``default_cache_dir()``)."""
    if bundle.format not in FORMATS:
        raise InputError(f"{bundle.folder}: a {bundle.format} bundle; OpenVINO runs ONNX bundles")
    if device != "cpu":
        raise InputError(f"the openvino backend runs on 'cpu', not {device!r}")
    precision = choose_precision(dtype)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return OpenVinoBackend(bundle, precision, threads or default_threads(), cache)
