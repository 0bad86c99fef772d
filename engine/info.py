"""A model's summary from its config files and weight headers, without loading a single weight; a bundle's
from its manifest."""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from engine.checkpoints import WEIGHTED_COMPONENTS, ModelSource
from engine.config import read_model_config
from engine.errors import InputError
from engine.manifest import Bundle


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), read without the library."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (struct.error, ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header


def weight_summary(paths: tuple[Path, ...]) -> tuple[int, dict[str, int]]:
    """(parameter count, parameters per dtype) from the headers of safetensors files."""
    counts: Counter = Counter()
    for path in paths:
        for tensor in safetensors_header(path).values():
            size = 1
            for dim in tensor["shape"]:
                size *= dim
            counts[tensor["dtype"]] += size
    return sum(counts.values()), dict(counts)


def describe_model(source: ModelSource) -> str:
    """Human-readable lines: each component's class, parameters, dtypes and channels, then the scheduler."""
    folder = source.folder
    model = read_model_config(folder)
    lines = [f"model: {folder}"]
    for name in WEIGHTED_COMPONENTS:
        config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        cls = config.get("_class_name") or (config.get("architectures") or ["?"])[0]
        weights = source.weights(name)
        variant = f"variant {weights.variant}, " if weights.variant else ""
        if weights.safetensors:
            total, dtypes = weight_summary(weights.files)
            params = f"{variant}{total / 1e6:.1f}M parameters ({', '.join(f'{k} {v / 1e6:.1f}M' for k, v in dtypes.items())})"
        else:
            params = f"{variant}weights in .bin form ({len(weights.files)} file(s), parameters not counted)"
        extra = ""
        if name == "unet":
            extra = f", channels {config['in_channels']} -> {config['out_channels']}, blocks {tuple(config['block_out_channels'])}"
        elif name == "vae":
            extra = f", latent channels {model.latent_channels}, scaling factor {model.scaling_factor}"
        elif name == "text_encoder":
            extra = f", hidden {model.text_dim}, {config.get('num_hidden_layers')} layers"
        lines.append(f"{name}: {cls}, {params}{extra}")
    lines += _scheduler_lines(model)
    return "\n".join(lines)


def describe_bundle(bundle: Bundle) -> str:
    """Format, precision, profile, each component's files and size, and the scheduler, from the manifest."""
    m = bundle.manifest
    profile = bundle.profile
    lines = [
        f"bundle: {bundle.folder} ({m.format}, {m.precision}, from {m.source.model})",
        f"profile: batch {':'.join(map(str, profile.batch))}, height {':'.join(map(str, profile.height))}, "
        f"width {':'.join(map(str, profile.width))}{' (static)' if profile.static else ''}",
    ]
    for name, entry in m.components.items():
        size = sum(f.bytes for f in entry.files)
        lines.append(f"{name}: {entry.precision}, {size / 1e6:.1f} MB, inputs "
                     + ", ".join(f"{t.name} {tuple(t.dims)}" for t in entry.inputs))
    lines += _scheduler_lines(bundle.model)
    lines.append(runtime_line(bundle))
    return "\n".join(lines)


def runtime_line(bundle: Bundle, device: str = "cpu") -> str:
    """Which runtime runs ``bundle`` here when none is named, in which precision, and why."""
    from engine.backends import bundle_runtime

    backend, why = bundle_runtime(bundle.format, device)
    precision = bundle.manifest.precision
    if backend == "openvino":
        from engine.backends.openvino_backend import choose_precision

        precision = choose_precision(None) if precision != "int8" else f"int8 (UNet), {choose_precision(None)}"
        why += "; bfloat16 where the CPU computes it natively, else float32"
    return f"runtime here: {backend} in {precision} on {device} ({why})"


def _scheduler_lines(model) -> list[str]:
    sched = model.scheduler
    return [
        f"scheduler: {sched.get('_class_name')}, {sched.get('beta_schedule')} betas "
        f"{sched.get('beta_start')}-{sched.get('beta_end')}, {sched.get('num_train_timesteps')} steps, "
        f"{model.prediction_type}, steps_offset {sched.get('steps_offset', 0)}",
        f"default resolution: {model.default_resolution}, sides multiple of {model.downsampling}",
    ]
