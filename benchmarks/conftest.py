"""Benchmark plumbing: which cases run, the systems under test (built once per session, cached on disk
where expensive), the machine's measured peak, FLOPs and reference outputs."""
from __future__ import annotations

import gc
import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from benchmarks import hardware
from benchmarks.runners import EDIT_STEPS, NETWORK_STAGES, STAGES, DiffusersRunner, EngineRunner
from engine.presets import PRESETS

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("IP2P_BENCH_CACHE", Path.home() / ".cache" / "ip2p" / "bench"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# variants of a backend between its name and precision: "cl" channels-last UNet and VAE (diffusers' best CPU
# setting, with bf16 where native), "kv2" token downsampling (kv_downsample=2, approximate by design), "compile"
# the UNet through torch.compile, "graph" onnxruntime's CUDA graphs (static bundles only), a preset name
# (balanced, fast: the edit stage runs that preset)
CPU_BACKENDS = ("diffusers-fp32", "diffusers-cl-bf16", "torch-fp32", "torch-bf16", "torch-compile-bf16",
                "torch-kv2-bf16", "torch-kv2-compile-bf16", "onnxruntime-fp32", "onnxruntime-fp16",
                "torch-balanced-bf16", "torch-fast-bf16", "onnxruntime-fast-fp32", "openvino-bf16",
                "openvino-fast-bf16")
GPU_BACKENDS = ("diffusers-fp16", "torch-fp32", "torch-fp16", "torch-compile-fp16", "torch-kv2-fp16",
                "onnxruntime-fp16", "onnxruntime-graph-fp16", "tensorrt-fp16", "torch-balanced-fp16",
                "torch-fast-fp16", "onnxruntime-fast-fp16")
BASELINE = "diffusers-fp16" if DEVICE == "cuda" else "diffusers-fp32"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
REFERENCE = "torch-fp32"  # FLOPs are counted and accuracies measured on it


@dataclass(frozen=True)
class Case:
    model: str
    resolution: int
    stage: str
    backend: str

    def __str__(self) -> str:
        return f"{self.model}-{self.resolution}-{self.stage}-{self.backend}"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="every stage on tiny and sd15 at 256 and 512 (the default is the quick set)")


def preset_of(backend: str) -> str | None:
    return next((v for v in backend.split("-")[1:-1] if v in PRESETS), None)


def cases(full: bool) -> list[Case]:
    """Backend by backend per model, so that only one system of a model besides the reference is alive.
    A preset backend differs from its exact one only in the edit, so it runs only the edit stage."""
    backends = GPU_BACKENDS if DEVICE == "cuda" else CPU_BACKENDS
    out = [Case("tiny", 64, s, b) for b in backends for s in STAGES]
    if full:
        out += [Case("sd15", r, s, b) for b in backends for r in (256, 512) for s in STAGES]
    else:  # the UNet step and the whole 512x512 edit
        out += [Case("sd15", 512, s, b) for b in backends for s in ("unet_step", "edit")]
    return [c for c in out if c.stage == "edit" or preset_of(c.backend) is None]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        selected = cases(metafunc.config.getoption("--full"))
        metafunc.parametrize("case", selected, ids=[str(c) for c in selected])


def bundle_profile(kind: str):
    """Shapes of the benchmark's bundles: one 64 px image for tiny (static), 256-512 px for sd15."""
    from engine.specs import Profile

    sides = (64, 64, 64) if kind == "tiny" else (256, 512, 512)
    return Profile((1, 1, 1), sides, sides)


class Systems:
    """Lazily built, shared systems under test, and everything measured once per session."""

    def __init__(self, cache: Path, device: str):
        self.cache, self.device = cache, device
        self.edit_steps = EDIT_STEPS["cuda" if device.startswith("cuda") else "cpu"]
        self._runners: dict[tuple[str, str], Any] = {}
        self._flops: dict[tuple, int] = {}
        self._refs: dict[tuple, np.ndarray] = {}
        self._peaks: dict[str, float] = {}

    def model_dir(self, kind: str) -> Path:
        from engine.random_models import create_model

        path = self.cache / kind
        if not (path / "model_index.json").is_file():
            log.warning("creating the random-weight %s model in %s (once)", kind, path)
            create_model(kind, path, seed=0)
        return path

    def bundle_dir(self, kind: str, precision: str) -> Path:
        from engine.manifest import is_bundle
        from export.bundle import ExportOptions, export_bundle

        path = self.cache / f"{kind}-onnx-{precision}"
        if not is_bundle(path):
            log.warning("exporting the %s %s ONNX bundle to %s (once)", kind, precision, path)
            export_bundle(self.model_dir(kind), path, ExportOptions(precision=precision, force=True,
                                                                    profile=bundle_profile(kind)))
        return path

    def int8_bundle_dir(self, kind: str) -> Path:
        """The fp32 bundle with its UNet quantized by ``ip2p quantize``, calibrated on a few synthetic edits (the
        random-weight models' pictures mean nothing: this bundle is for speed only)."""
        from engine.manifest import is_bundle
        from export.quantize import Calibration, quantize_bundle
        from training.synthetic import generate

        path, data = self.cache / f"{kind}-openvino-int8", self.cache / "calibration"
        if not is_bundle(path):
            if not (data / "metadata.jsonl").is_file():
                generate(data, 8, seed=5, progress=False)
            log.warning("quantizing the %s bundle to %s (once)", kind, path)
            quantize_bundle(self.bundle_dir(kind, "fp32"), path, Calibration(data, edits=2, steps=4, samples=8),
                            force=True)
        return path

    def runner(self, kind: str, backend: str):
        """The system for (model, backend). Building one drops the model's other systems except the float32
        torch reference: six sd15 systems at once (3.4 GB each in float32) overflow a 24 GiB machine."""
        key = (kind, backend)
        if key not in self._runners:
            if backend != REFERENCE:
                for other in [k for k in self._runners if k[0] == kind and k[1] != REFERENCE]:
                    del self._runners[other]
                gc.collect()
            self._runners[key] = self._build(kind, backend)
        return self._runners[key]

    def _build(self, kind: str, backend: str):
        from engine import EditPipeline

        name, *variants, precision = backend.split("-")
        if name == "diffusers":
            return DiffusersRunner(self.model_dir(kind), self.device, getattr(torch, DTYPES[precision]),
                                   self.edit_steps, channels_last="cl" in variants)
        preset = preset_of(backend) or "exact"
        variants = [v for v in variants if v not in PRESETS]
        if name == "torch":
            options = {}
            for variant in variants:
                if variant == "compile":
                    options["compile"] = True
                else:
                    options["kv_downsample"] = int(variant.removeprefix("kv"))
            return EngineRunner(EditPipeline.from_pretrained(self.model_dir(kind), device=self.device,
                                                             dtype=DTYPES[precision], progress=False,
                                                             backend_options=options), self.edit_steps, preset)
        if name == "onnxruntime":
            if self.device == "cuda":
                import onnxruntime

                if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                    pytest.skip("onnxruntime has no CUDA provider here (install the gpu extra)")
            options = None
            if "graph" in variants:
                if not bundle_profile(kind).static:
                    pytest.skip(f"CUDA graphs need a static-shape bundle; the {kind} bundle spans several sizes")
                options = {"cuda_graph": True}
            bundle = self.bundle_dir(kind, precision)
            return EngineRunner(EditPipeline.from_pretrained(bundle, backend="onnxruntime", device=self.device,
                                                             progress=False, backend_options=options),
                                self.edit_steps, preset)
        if name == "openvino":  # the fp32 bundle, computed in bf16 where the CPU has it natively
            from engine.cpu import native_dtype

            if precision == "bf16" and not native_dtype("bfloat16"):
                pytest.skip("bfloat16 is emulated on this CPU: OpenVINO runs float32 here (openvino-fp32)")
            return EngineRunner(EditPipeline.from_pretrained(self.bundle_dir(kind, "fp32"), backend="openvino",
                                                             dtype=DTYPES[precision], progress=False),
                                self.edit_steps, preset)
        if name == "tensorrt":
            pytest.skip("TensorRT bundles are benchmarked where TensorRT is installed: export with --format tensorrt")
        raise ValueError(backend)

    def flops(self, case: Case) -> int:
        """FLOPs of the stage, counted once with torch's FLOP counter on the float32 torch backend."""
        key = (case.model, case.stage, case.resolution)
        if key not in self._flops:
            fn = self.runner(case.model, REFERENCE).stage(case.stage, case.resolution)
            self._flops[key] = hardware.count_flops(fn)
        return self._flops[key]

    def reference(self, case: Case) -> np.ndarray:
        key = (case.model, case.stage, case.resolution)
        if key not in self._refs:
            self._refs[key] = self.runner(case.model, REFERENCE).stage(case.stage, case.resolution)()
        return self._refs[key]

    def peak(self, precision: str) -> float:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        if precision not in self._peaks:
            self._peaks[precision] = hardware.measured_peak_flops(self.device, dtype)
        return self._peaks[precision]

    def timed(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        if self.device != "cuda":
            return fn

        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out

        return synced


@pytest.fixture(scope="session")
def systems() -> Systems:
    return Systems(CACHE, DEVICE)


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS so far


def edit_psnr(out: Any, ref: np.ndarray) -> float | None:
    """PSNR in dB of edited images (float, [0, 1]) against the reference's for the same seed."""
    if not isinstance(out, np.ndarray) or out.shape != ref.shape:
        return None
    from training.evaluation import psnr

    return psnr(out, ref, peak=1.0)


def relative_error(out: Any, ref: np.ndarray) -> float | None:
    if not isinstance(out, np.ndarray) or out.shape != ref.shape:
        return None
    return float(np.abs(out.astype(np.float32) - ref).max() / max(float(np.abs(ref).max()), 1e-12))


__all__ = ["Case", "NETWORK_STAGES", "Systems", "peak_memory_bytes", "relative_error", "edit_psnr", "BASELINE"]
