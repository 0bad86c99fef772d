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
from engine.specs import UNET, UNET_GUIDED

Resolution = Union[int, None, Literal["auto"]]
VaeTile = Union[int, None, Literal["auto"]]  # tile side in pixels; None: never tile; "auto": past a memory budget


PRESET_NAMES = ("exact", "balanced", "fast")
PAPER_SCALES = (7.5, 1.5)  # InstructPix2Pix's (s_T, s_I) by default: the paper's and diffusers'


@dataclass(frozen=True)
class Student:
    """A UNet distilled to take the guidance scales as an input (``ip2p distill``): one UNet row per image and step,
    ``text_guidance``/``image_guidance`` meaning what they mean for its teacher, inside the ranges it learnt them
    over, and its own default scales where it edits best. Read from the model folder's ``distillation.json``; the
    UNet's ``time_cond_proj_dim`` (diffusers' own key) is twice ``embedding_dim``."""

    embedding_dim: int  # Fourier features per scale (engine.backends.torch_modules.scale_embedding)
    text_range: tuple[float, float]  # s_T it was trained over
    image_range: tuple[float, float]  # s_I
    sampler: str = "lcm"  # the sampler it was distilled for
    steps: tuple[int, int, int] = (4, 4, 2)  # steps of the presets exact, balanced, fast
    scales: tuple[float, float] = PAPER_SCALES  # its (s_T, s_I) when an edit gives none

    def preset_steps(self, preset: str) -> int:
        return self.steps[PRESET_NAMES.index(preset)]

    def check_scales(self, text_scale: float, image_scale: float) -> None:
        """Refuse scales outside the ranges the student learnt (it was never taught what they do there)."""
        for name, value, (lo, hi) in (("text_guidance", text_scale, self.text_range),
                                      ("image_guidance", image_scale, self.image_range)):
            if not lo <= value <= hi:
                raise InputError(f"{name} {value:g} is outside {lo:g}-{hi:g}, the range this distilled model was "
                                 f"trained over; pick one inside it or use the teacher model")


def read_student(model_dir: Path, unet: dict) -> Student | None:
    """The folder's ``distillation.json`` checked against its UNet config; None for a plain InstructPix2Pix."""
    path, proj = model_dir / "distillation.json", unet.get("time_cond_proj_dim")
    if not path.is_file():
        if proj:
            raise InputError(f"{model_dir}: the UNet takes a time condition (time_cond_proj_dim {proj}) but the "
                             "folder has no distillation.json: not a model `ip2p distill` made")
        return None
    data = _read_json(path, "distillation")
    try:
        student = Student(embedding_dim=int(data["embedding_dim"]), text_range=tuple(data["text_range"]),
                          image_range=tuple(data["image_range"]), sampler=str(data.get("sampler", "lcm")),
                          steps=tuple(int(v) for v in data.get("steps", (4, 4, 2))),
                          scales=tuple(float(v) for v in data.get("scales", PAPER_SCALES)))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not a distillation config ({err!r})") from None
    if proj != 2 * student.embedding_dim:
        raise InputError(f"{path}: embedding_dim {student.embedding_dim} needs the UNet's time_cond_proj_dim to be "
                         f"{2 * student.embedding_dim}, got {proj}")
    if student.sampler not in SAMPLERS or len(student.steps) != len(PRESET_NAMES) or min(student.steps) < 1:
        raise InputError(f"{path}: sampler must be one of {', '.join(SAMPLERS)} and steps three positive counts")
    if "scales" in data:  # absent: the teacher's, checked as any scale an edit asks for
        check_default_scales(student, str(path))
    return student


def check_default_scales(student: Student, where: str) -> None:
    """Refuse a student's own default scales unless they are two scales inside the ranges it learnt."""
    if len(student.scales) != 2:
        raise InputError(f"{where}: scales must be two numbers, its default (text_guidance, image_guidance)")
    try:
        student.check_scales(*student.scales)
    except InputError as err:
        raise InputError(f"{where}: default scales: {err}") from None


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
    unet_width: int = 320  # channels of the UNet's full-resolution level (its activations' size per latent pixel)
    student: Student | None = None  # a distilled UNet that takes the guidance scales (one row a step)

    @property
    def unet_component(self) -> str:
        """The spec name of the whole UNet (``engine.specs``): a student's takes the scales too."""
        return UNET_GUIDED.name if self.student else UNET.name

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
    return model_config_from(unet, vae, text, scheduler, read_student(model_dir, unet))


def model_config_from(unet: dict, vae: dict, text: dict, scheduler: dict, student: Student | None = None) -> ModelConfig:
    """ModelConfig from the UNet, VAE, text encoder and scheduler configs (diffusers/transformers keys)."""
    return ModelConfig(
        student=student,
        scheduler=dict(scheduler),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        vae_factor=2 ** (len(vae["block_out_channels"]) - 1),
        unet_factor=2 ** (len(unet["block_out_channels"]) - 1),
        unet_sample_size=int(unet.get("sample_size", 64)),
        latent_channels=int(vae.get("latent_channels", 4)),
        text_dim=int(text.get("hidden_size", text.get("text_config", {}).get("hidden_size", 768))),
        vae_width=int(vae["block_out_channels"][0]),
        vae_norms=vae_norm_layers(vae),
        unet_width=int(unet["block_out_channels"][0]),
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
    text_guidance: float = PAPER_SCALES[0]
    image_guidance: float = PAPER_SCALES[1]
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
