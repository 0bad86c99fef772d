"""TensorRT engines from a bundle's ONNX graphs, through TensorRT's Python API.

fp16 engines (the VAE decoder stays fp32: SD's VAE can overflow in fp16), optimisation profiles from
``engine.specs``, a persistent timing cache, and an engine cache keyed by everything that makes an
engine valid, so a second export for the same GPU is instant and a stale engine is never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from engine import specs
from engine.backends.tensorrt_backend import require_tensorrt
from engine.errors import ExportError
from engine.manifest import Component, file_entry
from engine.specs import Range
from engine.files import atomic_path

log = logging.getLogger(__name__)

FP32_COMPONENTS = (specs.VAE_DECODER.name, *specs.TILE_COMPONENTS)  # the tile networks: see TILE_COMPONENTS
WORKSPACE_BYTES = 8 << 30


def cache_dir() -> Path:
    """Where engines and timing caches persist: $IP2P_ENGINE_CACHE or ~/.cache/ip2p/tensorrt."""
    return Path(os.environ.get("IP2P_ENGINE_CACHE", Path.home() / ".cache" / "ip2p" / "tensorrt"))


def engine_cache_key(onnx_sha256: str, precision: str, profiles: list[dict], tensorrt_version: str, gpu: dict) -> str:
    """Hex key of one engine: ONNX content, precision, every profile's min/opt/max input shapes, TensorRT
    version, GPU name and compute capability. Any change gives another key."""
    material = json.dumps(
        {"onnx": onnx_sha256, "precision": precision,
         "profiles": [{k: [list(s) for s in v] for k, v in sorted(shapes.items())} for shapes in profiles],
         "tensorrt": tensorrt_version, "gpu": gpu["name"], "cc": gpu["compute_capability"]},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def timing_cache_name(tensorrt_version: str, gpu: dict) -> str:
    tag = "".join(c if c.isalnum() else "-" for c in gpu["name"])
    return f"timing-{tensorrt_version}-{tag}-sm{gpu['compute_capability'].replace('.', '')}.cache"


def input_shapes(spec: specs.ComponentSpec, dims: dict[str, Range]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shape of every input of ``spec`` (outputs are inferred by TensorRT)."""
    ranges = specs.shape_ranges(spec, dims)
    return {t.name: ranges[t.name] for t in spec.inputs}


def engine_profiles(dims: dict[str, Range], static: bool) -> list[dict[str, Range]]:
    """The optimisation profiles' dimension ranges: the bundle's own, or for a static bundle one profile per
    UNet row count it can be asked for (B to 3B: images dropping guidance branches), so that step-varying
    guidance runs on static engines and CUDA graphs too."""
    if not static:
        return [dims]
    b = dims["B"][0]
    return [dims | {"N": (n, n, n)} for n in range(b, 3 * b + 1)]


def profile_shapes(spec: specs.ComponentSpec, profiles: list[dict[str, Range]]) -> list[dict]:
    """min/opt/max input shapes of each profile for ``spec``, without repeats (a network without UNet rows
    gets one)."""
    shapes: list[dict] = []
    for dims in profiles:
        ranges = input_shapes(spec, dims)
        if ranges not in shapes:
            shapes.append(ranges)
    return shapes


def build_engine(onnx_path: Path, profiles: list[dict], fp16: bool, timing_cache: Path, out: Path) -> None:
    """Parse ``onnx_path`` and build one engine with an optimisation profile per entry of ``profiles`` (input
    name -> min/opt/max shape); updates the timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path.name}: TensorRT cannot parse the graph ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path.name}: TensorRT failed to build an engine")
    out.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_engines(staging: Path, components: dict[str, Component], dims: dict[str, Range],
                  static: bool) -> tuple[dict[str, Component], dict]:
    """Build (or take from the cache) an engine for every component, its profiles from ``dims`` (the bundle's
    ranges of every symbolic dimension, ``engine_profiles``). Returns the manifest entries, each with the engine
    as its first file, and the GPU the engines are for."""
    import tensorrt as trt

    gpu = require_tensorrt()
    cache = cache_dir()
    timing = cache / timing_cache_name(trt.__version__, gpu)
    built = {}
    for name, entry in components.items():
        onnx_entry = entry.files[0]
        fp16 = name not in FP32_COMPONENTS
        profiles = profile_shapes(specs.component_spec(name), engine_profiles(dims, static))
        key = engine_cache_key(onnx_entry.sha256, "fp16" if fp16 else "fp32", profiles, trt.__version__, gpu)
        cached = cache / f"{name}-{key}.plan"
        if cached.is_file():
            log.info("%s: engine from the cache (%s)", name, cached.name)
        else:
            log.info("%s: building a TensorRT engine (minutes for sd15)", name)
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(cached) as tmp:
                build_engine(staging / onnx_entry.path, profiles, fp16, timing, tmp)
        target = staging / f"{name}.plan"
        shutil.copyfile(cached, target)
        built[name] = replace(entry, files=(file_entry(staging, target), *entry.files),
                              precision="fp16" if fp16 else "fp32", engine_key=key)
    return built, gpu
