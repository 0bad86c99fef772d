"""A model's summary from its config files and weight headers, without loading a single weight."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from engine.config import read_model_config

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def weight_summary(path: Path) -> tuple[int, dict[str, int]]:
    """(parameter count, parameters per dtype) from a safetensors header."""
    from safetensors import safe_open

    counts: Counter = Counter()
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            tensor = f.get_slice(key)
            size = 1
            for dim in tensor.get_shape():
                size *= dim
            counts[tensor.get_dtype()] += size
    return sum(counts.values()), dict(counts)


def describe_model(folder: Path) -> str:
    """Human-readable lines: each component's class, parameters, dtypes and channels, then the scheduler."""
    model = read_model_config(folder)
    lines = [f"model: {folder}"]
    for name, weights in WEIGHT_FILES.items():
        config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        cls = config.get("_class_name") or (config.get("architectures") or ["?"])[0]
        path = folder / name / weights
        if path.is_file():
            total, dtypes = weight_summary(path)
            params = f"{total / 1e6:.1f}M parameters ({', '.join(f'{k} {v / 1e6:.1f}M' for k, v in dtypes.items())})"
        else:
            params = "weights not in safetensors form"
        extra = ""
        if name == "unet":
            extra = f", channels {config['in_channels']} -> {config['out_channels']}, blocks {tuple(config['block_out_channels'])}"
        elif name == "vae":
            extra = f", latent channels {model.latent_channels}, scaling factor {model.scaling_factor}"
        elif name == "text_encoder":
            extra = f", hidden {model.text_dim}, {config.get('num_hidden_layers')} layers"
        lines.append(f"{name}: {cls}, {params}{extra}")
    sched = model.scheduler
    lines.append(
        f"scheduler: {sched.get('_class_name')}, {sched.get('beta_schedule')} betas "
        f"{sched.get('beta_start')}-{sched.get('beta_end')}, {sched.get('num_train_timesteps')} steps, "
        f"{model.prediction_type}, steps_offset {sched.get('steps_offset', 0)}"
    )
    lines.append(f"default resolution: {model.default_resolution}, sides multiple of {model.downsampling}")
    return "\n".join(lines)

