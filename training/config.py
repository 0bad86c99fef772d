"""Every training option in one frozen dataclass; a YAML file and CLI flags fill it, the saved model carries it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError
from training.recipe import Recipe


@dataclass(frozen=True)
class TrainConfig:
    base: str = ""  # Stable Diffusion (4-channel) or InstructPix2Pix (8-channel) model
    base_variant: str | None = None  # the base's weight variant to load ("fp16"); None: plain files, else the only one
    data: str = ""  # folder with metadata.jsonl
    output: str = ""
    max_steps: int = 1000  # optimiser steps; 0 saves the initialised model
    resolution: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"  # any diffusers.optimization schedule
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    conditioning_dropout: float = 0.05  # p of Brooks et al. sec. 3.2.1
    ema_decay: float = 0.9999  # 0 disables EMA
    gradient_checkpointing: bool = False
    latent_cache_mb: int = 0  # keep VAE encodings of repeated pairs in memory up to this size (0: off)
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit, where installed
    log_every: int = 10  # rows of <output>/log.csv
    validate_every: int = 0  # save an edit of the first training pair every N steps (0: never)
    validation_steps: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    save_dtype: str = "float32"  # weights of the saved model: float32 | float16 (halves its size)
    recipe: Recipe | None = None  # build base model and data first (training/recipe.py) instead of --base/--data

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.batch_size < 1 or self.grad_accum < 1 or self.resolution < 8:
            raise InputError("max_steps >= 0, batch_size >= 1, grad_accum >= 1 and resolution >= 8 are required")
        if self.latent_cache_mb < 0:
            raise InputError(f"latent_cache_mb must be >= 0, got {self.latent_cache_mb}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.save_dtype not in ("float32", "float16"):
            raise InputError(f"save_dtype must be float32 or float16, got {self.save_dtype!r}")
        if not 0 <= self.conditioning_dropout <= 1 / 3:
            raise InputError("conditioning_dropout must be in [0, 1/3]: three disjoint cases of probability p")


def read_options(path: str | Path | None, config_class: type) -> dict:
    """The options of YAML file ``path`` (none: {}), each a field of dataclass ``config_class``; one line naming the
    file for a missing file, bad YAML or an unknown option."""
    import yaml

    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise InputError(f"{path}: no such config file") from None
        except yaml.YAMLError as err:
            raise InputError(f"{path}: invalid YAML ({err})") from None
    unknown = set(values) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise InputError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
    return values


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Defaults, then the YAML file, then non-None ``overrides`` (CLI flags)."""
    values = read_options(path, TrainConfig)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("recipe") is not None:
        values["recipe"] = Recipe.from_dict(values["recipe"], str(path))
    for required in ("output",) if values.get("recipe") else ("base", "data", "output"):
        if not values.get(required):
            raise InputError(f"--{required} is required (or set it in the config file)")
    return TrainConfig(**values)
