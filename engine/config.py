"""Frozen settings that flow CLI -> pipeline -> backend: what a model is, and how one edit runs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from engine.caching import StepCache
from engine.errors import InputError
from engine.guidance import GuidanceOptions
from engine.samplers import SAMPLERS

Resolution = Union[int, None, Literal["auto"]]
VaeTile = Union[int, None, Literal["auto"]]  # tile side in pixels; None: never tile; "auto": past a memory budget


@dataclass(frozen=True)
class ModelConfig:
    """What the pipeline needs to know about a model, read from its config files (never its weights)."""

    scheduler: dict = field(hash=False)  # diffusers scheduler config
    scaling_factor: float  # VAE latent scaling, 0.18215 for SD 1.5
    vae_factor: int  # VAE spatial downsampling, 8 for SD 1.5
    unet_factor: int  # UNet spatial downsampling, 8 for SD 1.5
    unet_sample_size: int  # latent size the UNet was trained at, 64 for SD 1.5
    latent_channels: int
    text_dim: int  # width of the text embeddings, 768 for CLIP ViT-L/14
    vae_width: int = 128  # channels of the VAE's full-resolution level (its activations' size per pixel)
    vae_norms: tuple[int, int, int] = (0, 0, 32)  # GroupNorm layers of the VAE encoder, of its decoder; groups

    @property
    def downsampling(self) -> int:
        """Pixel sides must be multiples of this."""
        return self.vae_factor * self.unet_factor

    @property
    def default_resolution(self) -> int:
        return self.unet_sample_size * self.vae_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path.parent}: missing {what} config {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON ({err})") from None


def read_model_config(model_dir: Path) -> ModelConfig:
    """ModelConfig of a diffusers-format InstructPix2Pix folder; refuses anything else clearly."""
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (model_dir / name).is_dir():
            raise InputError(f"{model_dir}: missing component folder {name}/")
    unet = _read_json(model_dir / "unet" / "config.json", "UNet")
    vae = _read_json(model_dir / "vae" / "config.json", "VAE")
    text = _read_json(model_dir / "text_encoder" / "config.json", "text encoder")
    scheduler = _read_json(model_dir / "scheduler" / "scheduler_config.json", "scheduler")
    check_unet_channels(unet.get("in_channels"), model_dir)
    return model_config_from(unet, vae, text, scheduler)


def model_config_from(unet: dict, vae: dict, text: dict, scheduler: dict) -> ModelConfig:
    """ModelConfig from the UNet, VAE, text encoder and scheduler configs (diffusers/transformers keys)."""
    return ModelConfig(
        scheduler=dict(scheduler),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        vae_factor=2 ** (len(vae["block_out_channels"]) - 1),
        unet_factor=2 ** (len(unet["block_out_channels"]) - 1),
        unet_sample_size=int(unet.get("sample_size", 64)),
        latent_channels=int(vae.get("latent_channels", 4)),
        text_dim=int(text.get("hidden_size", text.get("text_config", {}).get("hidden_size", 768))),
        vae_width=int(vae["block_out_channels"][0]),
        vae_norms=vae_norm_layers(vae),
    )


def vae_norm_layers(vae: dict) -> tuple[int, int, int]:
    """GroupNorm layers of a diffusers AutoencoderKL's encoder and decoder, and their groups, from its config: two
    per ResNet (``layers_per_block`` a down block, one more an up block; two in the middle), the middle's attention
    (unless left out) and the output norm."""
    blocks, layers = len(vae["block_out_channels"]), int(vae.get("layers_per_block", 1))
    middle = 2 * 2 + int(vae.get("mid_block_add_attention", True)) + 1
    return 2 * layers * blocks + middle, 2 * (layers + 1) * blocks + middle, int(vae.get("norm_num_groups", 32))


def check_unet_channels(in_channels: int | None, where: Path | str) -> None:
    if in_channels == 8:
        return
    if in_channels == 4:
        raise InputError(f"{where}: a 4-channel text-to-image UNet is not an InstructPix2Pix model (need 8 input channels)")
    raise InputError(f"{where}: the UNet has {in_channels} input channels; an InstructPix2Pix UNet has 8")


@dataclass(frozen=True)
class EditConfig:
    """Settings of one edit call; validated on construction."""

    steps: int = 20
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    sampler: str = "euler_ancestral"
    resolution: Resolution = "auto"
    keep_size: bool = False
    keep_detail: bool = False  # edit at the resolution, carry only the change back onto the full-size input
    vae_tile: VaeTile = "auto"
    output_type: Literal["pil", "np"] = "pil"
    guidance: GuidanceOptions = GuidanceOptions()  # exact by default; interval and adaptive rule approximate
    step_cache: StepCache = StepCache()  # off by default; DeepCache's reuse of deep features approximates

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.resolution not in (None, "auto") and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise InputError(f"resolution must be a positive integer, None or 'auto', got {self.resolution!r}")
        tile = self.vae_tile
        if tile not in (None, "auto") and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 8):
            raise InputError(f"vae_tile must be a tile side in pixels, None or 'auto', got {self.vae_tile!r}")
        if self.keep_detail and self.resolution is None:
            raise InputError("keep_detail carries an edit made at a working resolution back to the input's size; "
                             "with resolution=None the edit is already at full size: drop one of them")
        if self.output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {self.output_type!r}")
        for name in ("text_guidance", "image_guidance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value:
                raise InputError(f"{name} must be a number, got {value!r}")
