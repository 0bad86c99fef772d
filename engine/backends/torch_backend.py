"""PyTorch runtime: runs the spec-named modules of ``engine.backends.torch_modules`` in one dtype on one
device, eagerly or through ``torch.compile`` (on CUDA with CUDA graphs), answering ``run(component, inputs)`` by
the names of ``engine.specs``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from engine import specs
from engine.backends.torch_modules import load_networks, split_modules, tile_module, unet_macs, wrap_components
from engine.checkpoints import ModelSource
from engine.cpu import cpu_precision
from engine.errors import CompileError, InputError, quote_error

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_DTYPE = {"cuda": "float16"}  # by device type; float32 elsewhere (exact; a CPU's bfloat16 is asked for)

FP32_DECODER = specs.VAE_DECODER_FP32
# On a CPU, oneDNN's convolutions run faster on NHWC ("channels last") tensors: the sd15 VAE, nothing but
# convolutions and one attention, took 13-21% less time that way at 512 px in bf16 and fp32 (interleaved A/B,
# AVX512 host, docs/benchmarks.md); the UNet did not gain (its attention reshapes undo the layout): NCHW.
# They run image by image: at another batch size they round differently (by up to 16 levels of a pixel in
# bf16 on the shipped model), and a server batching requests promises each its solo pixels. The cost was
# within noise on the shipped model at 64 px, batch 8 (2.13 against 2.11 edits/s in fp32, 2.82 / 2.70 in bf16).
CHANNELS_LAST_ON_CPU = (specs.VAE_ENCODER.name, specs.VAE_DECODER.name, FP32_DECODER)
# On CUDA, cuDNN's float16 convolutions are fastest channels last, the UNet's too (diffusers' own advice for
# GPUs); a GPU promises no batch-invariant rounding, so they run batched.
CHANNELS_LAST_ON_CUDA = (*specs.UNETS, specs.VAE_ENCODER.name, specs.VAE_DECODER.name, FP32_DECODER)
COMPILED = (*specs.UNETS, specs.VAE_DECODER.name)  # with compile: these and the UNet's halves (step caching)
# Shapes one compiled network takes (row counts x latent sizes; torch's own limit is 8) before it refuses with a
# clear error rather than, as torch would, running the rest eagerly without a word.
COMPILED_SHAPES = 64
RECOMPILES = 256  # torch's own limit per code object, above ours: the halves of the UNet share their classes' code
COMPILE_CACHE = Path.home() / ".cache" / "ip2p" / "torch-compile"  # inductor's compiled kernels, across processes


class TorchBackend:
    """Runs the wrapped networks under ``torch.inference_mode`` in one dtype on one device: eagerly, or with
    ``compile`` the UNets (and the halves split from them for step caching, made when first asked for) and the
    VAE decoder through ``torch.compile``, compiled once per input shape; with ``graphs`` (CUDA) each compiled
    shape is captured as a CUDA graph whose static input buffers torch owns, and replayed. ``shapes`` lists the
    input shapes each compiled network has taken."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, dtype: torch.dtype,
                 compile: bool = False, graphs: bool = False):
        self.device, self.dtype, self.compile, self.graphs = device, dtype, compile, graphs
        self.value_bytes = dtype.itemsize
        self._unet_name = next(name for name in specs.UNETS if name in modules)
        wrapper = modules[self._unet_name]
        self._unet, self._kv_downsample = wrapper.unet, wrapper.kv_downsample  # the diffusers UNet, for splits
        self._channels_last = set(CHANNELS_LAST_ON_CPU if device.type == "cpu" else CHANNELS_LAST_ON_CUDA)
        self._modules = {name: (m.to(device=device, dtype=dtype), dtype) for name, m in modules.items()}
        for name in self._channels_last & set(self._modules):
            self._modules[name][0].to(memory_format=torch.channels_last)
        self._macs: dict[str, float] = {}  # per component
        self.shapes: dict[str, dict[tuple, int]] = {}  # compiled component -> input shape -> calls run at it
        self._eager = {name: module for name, (module, _) in self._modules.items()}  # tile networks, fp32 decoder
        if compile:
            for name in set(COMPILED) & set(self._modules):
                self._modules[name] = (self._compiled(self._modules[name][0]), dtype)
            log.info("the UNet and the VAE decoder are compiled at their first call for each new input shape (about a "
                     "minute on 2 CPU cores for SD 1.5)%s, then run compiled",
                     ", and captured as CUDA graphs" if graphs else "")

    def _compiled(self, module: nn.Module) -> nn.Module:
        # freezing: weights become constants, so inductor folds them (and on CPUs pre-packs them for oneDNN)
        return torch.compile(module, dynamic=False, options={"freezing": True, "triton.cudagraphs": self.graphs})

    def has(self, component: str) -> bool:
        if component in self._modules or (component == FP32_DECODER and self.dtype != torch.float32):
            return True
        if component in specs.TILE_COMPONENTS:
            return True
        return split_modules(self._unet, component, self._kv_downsample) is not None  # InputError: no such level

    def _module(self, component: str) -> tuple[nn.Module, torch.dtype]:
        if component not in self._modules:
            if component == FP32_DECODER:  # the overflow fallback: rare, eager
                module, dtype = copy.deepcopy(self._eager[specs.VAE_DECODER.name]).float(), torch.float32
            elif component in specs.TILE_COMPONENTS:
                module, dtype = tile_module(self._eager, component), self.dtype
            else:
                module, dtype = split_modules(self._unet, component, self._kv_downsample), self.dtype
                if module is None:
                    raise KeyError(f"no component {component!r}")
                if self.compile:
                    module = self._compiled(module)
            self._modules[component] = (module, dtype)
        return self._modules[component]

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, Any]:
        module, dtype = self._module(component)
        spec = specs.VAE_DECODER if component == FP32_DECODER else specs.component_spec(component)
        layout = torch.channels_last if component in self._channels_last else torch.contiguous_format
        args = {k: v.to(dtype).contiguous(memory_format=layout) if v.is_floating_point() else v
                for k, v in inputs.items()}
        compiled = isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
        with torch.inference_mode(), self._compiled_call(component, args) if compiled else contextlib.nullcontext():
            if layout is torch.channels_last and self.device.type == "cpu":  # image by image: see CHANNELS_LAST_ON_CPU
                rows = len(next(iter(args.values())))
                outs = [self._outputs(module(**{k: v[i : i + 1] for k, v in args.items()})) for i in range(rows)]
                outs = tuple(torch.cat(parts) for parts in zip(*outs))
            else:
                outs = self._outputs(module(**args))
            # a CUDA graph's outputs are its static buffers, overwritten by the next replay: copied out
            return {name: value.float().contiguous().clone() if self.graphs else value.float().contiguous()
                    for name, value in zip(spec.output_names, outs)}

    @contextlib.contextmanager
    def _compiled_call(self, component: str, args: dict[str, torch.Tensor]):
        """A call of a compiled network: its shapes counted, at most COMPILED_SHAPES of them, each graph replay a new
        step for torch's CUDA graph trees; a compile that fails, or runs out of memory while a shape is compiled
        or captured, is a CompileError naming the setting to turn off."""
        calls = self.shapes.setdefault(component, {})
        signature = tuple((k, tuple(v.shape)) for k, v in sorted(args.items()))
        if signature not in calls and len(calls) >= COMPILED_SHAPES:
            raise InputError(f"{component}: compiled for {len(calls)} input shapes already (row counts x sizes), "
                             "the most one network keeps: run without compile, or with fewer sizes")
        # compiled at a shape's first call; torch's CUDA graph trees run that call as it is and record at the second
        settling = calls.get(signature, 0) < (2 if self.graphs else 1)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILES, fail_on_recompile_limit_hit=True):
                yield
        except torch._dynamo.exc.TorchDynamoException as err:  # tracing or inductor (its C++ or Triton build)
            if isinstance(getattr(err, "inner_exception", None), torch.OutOfMemoryError):
                raise self._memory_error(component, signature) from err
            raise CompileError(f"{component}: torch.compile failed at {shape_text(signature)} "
                               f"({quote_error(err)}): run without compile (no --compile)") from err
        except torch.OutOfMemoryError as err:
            if not settling:  # a shape that already ran: torch's own error, as eagerly
                raise
            raise self._memory_error(component, signature) from err
        calls[signature] = calls.get(signature, 0) + 1

    def _memory_error(self, component: str, signature: tuple) -> CompileError:
        what, off = ("compiling and capturing a CUDA graph", "without CUDA graphs (--no-cuda-graphs), ") \
            if self.graphs else ("compiling", "")
        return CompileError(f"{component}: out of memory {what} at {shape_text(signature)}: run {off}with fewer rows "
                            "a call (ip2p serve --max-batch) or without compile (no --compile)")

    @staticmethod
    def _outputs(out) -> tuple:
        return out if isinstance(out, tuple) else (out,)

    def macs(self, component: str) -> float:
        """Multiply-accumulates of one row of a UNet component at the model's own latent size (counted once)."""
        if component not in self._macs:
            side = int(self._unet.config.sample_size)
            text_dim = int(self._unet.config.cross_attention_dim)
            self._macs[component] = unet_macs(self._unet, component, (side, side), text_dim, self._kv_downsample)
        return self._macs[component]

    def asarray(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().float().cpu().numpy()

    def concat(self, arrays: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def constant(self, array: torch.Tensor) -> torch.Tensor:
        return array  # already on the device


def shape_text(signature: tuple[tuple[str, tuple[int, ...]], ...]) -> str:
    """``(("sample", (3, 8, 64, 64)), ...)`` as "sample 3x8x64x64, ..." for a message."""
    return ", ".join(f"{name} {'x'.join(map(str, shape)) or 'scalar'}" for name, shape in signature)


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} asked for, but MPS is not available")
    return dev


def check_compiler(device: torch.device) -> None:
    """torch.compile's CPU code is C++ built at run time: refuse up front where no compiler is installed."""
    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise InputError("compile on a CPU needs a C++ compiler (g++ or clang++) to build its kernels; "
                         "install one or run without compile")


def load(source: ModelSource, device: str = "cpu", dtype: str | None = None, kv_downsample: int = 1,
         compile: bool = False, graphs: bool | None = None, compile_cache: str | os.PathLike | None = None,
         keep_dtype: bool = False) -> TorchBackend:
    """A TorchBackend for a model on ``device`` in ``dtype`` ("float32", "float16" or "bfloat16"; by default float16
    on CUDA, float32 elsewhere; on a CPU that only emulates the reduced precision, float32, which is faster there,
    with a warning). ``kv_downsample`` 2 or more trades exactness for speed (``torch_modules.set_kv_downsampling``);
    1 is exact. ``compile`` runs the UNet and the VAE decoder through ``torch.compile`` (same results up to
    rounding, compiled per shape), its kernels kept in ``compile_cache`` (default $TORCHINDUCTOR_CACHE_DIR, else
    ~/.cache/ip2p/torch-compile) for the next process; ``graphs`` (CUDA only, on by default there with
    ``compile``) replays each compiled shape as a CUDA graph. ``keep_dtype`` runs ``dtype`` even where the CPU
    only emulates it (to reproduce its rounding, not for speed)."""
    dev = parse_device(device)
    dtype = dtype or DEFAULT_DTYPE.get(dev.type, "float32")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if not isinstance(kv_downsample, int) or isinstance(kv_downsample, bool) or not 1 <= kv_downsample <= 8:
        raise InputError(f"kv_downsample must be a whole number from 1 (exact) to 8, got {kv_downsample!r}")
    graphs = compile_settings(dev, compile, graphs)
    if dev.type == "cpu" and not keep_dtype:
        dtype, why = cpu_precision(dtype)
        if why:
            log.warning("%s (torch kernels: %s)", why, torch.backends.cpu.get_cpu_capability())
    if compile:
        check_compiler(dev)
        use_compile_cache(compile_cache)
    unet, vae, text_encoder = load_networks(source, DTYPES[dtype])
    return TorchBackend(wrap_components(unet, vae, text_encoder, kv_downsample), dev, DTYPES[dtype], compile, graphs)


def compile_settings(device: torch.device, compile: bool, graphs: bool | None) -> bool:
    """Whether to capture CUDA graphs: asked for, or by default where compiled on CUDA; refused where it cannot."""
    for name, value in (("compile", compile), ("graphs", graphs)):
        if value is not None and not isinstance(value, bool):
            raise InputError(f"{name} must be true or false, got {value!r}")
    if graphs and device.type != "cuda":
        raise InputError(f"graphs: CUDA graphs need a CUDA device, not {device.type!r}: turn graphs off")
    if graphs and not compile:
        raise InputError("graphs: CUDA graphs replay compiled networks: turn compile on, or graphs off")
    return compile and device.type == "cuda" if graphs is None else graphs


def use_compile_cache(folder: str | os.PathLike | None) -> None:
    """Point inductor's on-disk cache (compiled kernels and graphs, read back by a later process) at ``folder``,
    else at $TORCHINDUCTOR_CACHE_DIR where set, else at COMPILE_CACHE. Torch reads the variable at each lookup."""
    if folder is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    path = Path(folder) if folder is not None else COMPILE_CACHE
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"compile_cache {path}: cannot be made ({err.strerror})") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
