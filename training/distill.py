"""Distillation: ``ip2p distill TEACHER --data DATA -o OUT``, a student that runs one UNet row per step, in few steps.

The student is the teacher's UNet with an embedding of the two guidance scales (s_T, s_I) added to its time
embedding (diffusers' ``time_cond_proj_dim``/``timestep_cond``; ``engine.backends.torch_modules.scale_embedding``),
the new projection zero-initialised so that the student starts as the teacher's (instruction, image) branch.
Two stages, each run by ``_Stage`` (accelerate, mixed precision, EMA, checkpoints with exact resume, progress):

1. ``guidance`` (Meng et al. 2023, "On distillation of guided diffusion models", stage 1): at random timesteps and
   scales drawn from the configured ranges, the student's one row learns the teacher's three-row prediction of
   eq. 3 (mean squared error, in the teacher's own parametrisation); ``image_term_weight`` adds the error of the
   image term alone (a second row per example at another s_I), and ``scale_lr_scale`` trains the scale embedding
   at its own rate (both stages). ``scale_response`` measures how much of the two terms a student reproduces.
2. ``consistency`` (Luo et al. 2023, Latent Consistency Models): from stage 1's weights, consistency distillation
   over the ``original_inference_steps`` timesteps an ``lcm`` sampler takes its steps from, one DDIM step of the
   guided teacher between neighbours, a slowly moving target network, the pseudo-Huber loss. The guided teacher
   is ``consistency_teacher``: the teacher's own eq. 3 over its three rows (the default), or stage 1's student
   (one row where the teacher costs three, at the price of stage 1's error).

Every step's randomness is derived from (seed, stage, step), the data order from (seed, epoch): a checkpoint holds
the weights, optimiser, schedule, EMA, target network and data cursor, and resumes exactly. A finished stage leaves
its weights in ``<output>/<stage>/unet`` and is skipped when the command runs again; ``<output>/guidance/model`` is
stage 1's student as a model of its own (one row a step, any sampler: the teacher's 20 Euler-ancestral steps).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.backends.torch_modules import load_component, scale_embedding
from engine.checkpoints import resolve_model
from engine.config import PAPER_SCALES, PRESET_NAMES, read_model_config
from engine.errors import InputError
from engine.files import write_json_atomic
from engine.guidance import combine_guidance
from engine.schedules import alphas_cumprod
from engine.tokenizer import ClipTokenizer
from training.config import read_options
from training.data import PairedData
from training.train import (CHECKPOINTS, DataCursor, PairEncoder, _checkpoint_paths, _load_checkpoint, _log_row,
                            _resume_path, _save_checkpoint, copy_frozen_parts, next_batch, save_half_precision)

log = logging.getLogger(__name__)

STAGES = ("guidance", "consistency")
TIMESTEP_SCALING = 10.0  # LCM's boundary condition is taken at timestep * 10 (engine.samplers.lcm, diffusers)
SIGMA_DATA = 0.5
LR_SCHEDULES = ("constant_with_warmup", "cosine", "linear")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # an InstructPix2Pix model (diffusers folder, checkpoint or hub id)
    data: str = ""  # anything ``ip2p train`` reads
    output: str = ""
    resolution: int = 256
    batch_size: int = 8
    guidance_steps: int = 1000  # optimiser steps of stage 1
    consistency_steps: int = 1000  # of stage 2
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant_with_warmup"  # or cosine, linear (to zero at each stage's end): diffusers' names
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    ema_decay: float = 0.999  # of the weights each stage saves (0: the last weights)
    target_decay: float = 0.95  # stage 2's target network, an EMA of the student (LCM's)
    embedding_dim: int = 128  # Fourier features per scale; time_cond_proj_dim is twice this
    text_range: tuple[float, float] = (1.0, 12.0)  # s_T drawn uniformly from it; the student refuses others
    image_range: tuple[float, float] = (1.0, 3.0)  # s_I
    image_term_weight: float = 0.0  # stage 1: weight of the image term's own loss (0: off; guidance_loss says how)
    scale_lr_scale: float = 1.0  # the scale embedding's learning rate, a multiple of lr (it starts at zero)
    original_inference_steps: int = 50  # stage 2's timestep grid; an lcm sampler takes its steps from it
    huber_c: float = 0.001
    consistency_teacher: str = "teacher"  # stage 2's guided teacher: teacher (three rows) | guidance (stage 1's)
    preset_steps: tuple[int, int, int] = (4, 4, 2)  # lcm steps of the student's presets exact, balanced, fast
    default_scales: tuple[float, float] = PAPER_SCALES  # the student's (s_T, s_I) when an edit gives none: where it
    # edits best on a validation set (ip2p bench scales); stage 1's student keeps the teacher's
    latent_cache_mb: int = 0  # as ``ip2p train``
    log_every: int = 10  # rows of <output>/<stage>/log.csv
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    save_dtype: str = "float32"  # float32 | float16

    def __post_init__(self) -> None:
        if min(self.guidance_steps, self.consistency_steps) < 0 or self.batch_size < 1 or self.resolution < 8:
            raise InputError("guidance_steps and consistency_steps >= 0, batch_size >= 1 and resolution >= 8")
        for name in ("text_range", "image_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise InputError(f"{name} must be LO:HI with 0 <= LO <= HI, got {lo}:{hi}")
        if self.image_term_weight < 0 or self.scale_lr_scale <= 0:
            raise InputError("image_term_weight must be >= 0 and scale_lr_scale > 0")
        if self.embedding_dim < 2 or self.embedding_dim % 2:
            raise InputError(f"embedding_dim must be even and at least 2, got {self.embedding_dim}")
        if self.mixed_precision not in ("no", "fp16", "bf16") or self.save_dtype not in ("float32", "float16"):
            raise InputError("mixed_precision must be no, fp16 or bf16; save_dtype float32 or float16")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule}")
        if self.consistency_teacher not in ("teacher", "guidance"):
            raise InputError(f"consistency_teacher must be teacher or guidance, got {self.consistency_teacher}")
        if len(self.preset_steps) != len(PRESET_NAMES) or not all(0 < s <= self.original_inference_steps
                                                                   for s in self.preset_steps):
            raise InputError(f"preset_steps: three step counts within 1-{self.original_inference_steps}")
        if len(self.default_scales) != 2:
            raise InputError(f"default_scales: two numbers, s_T and s_I, got {list(self.default_scales)}")
        (text, image), (t_lo, t_hi), (i_lo, i_hi) = self.default_scales, self.text_range, self.image_range
        if not (t_lo <= text <= t_hi and i_lo <= image <= i_hi):
            raise InputError(f"default_scales {text:g}, {image:g} must lie inside text_range and image_range "
                             "(set default_scales where the ranges leave out 7.5, 1.5)")


def load_distill_config(path: str | Path | None, overrides: dict) -> DistillConfig:
    """Defaults, then the YAML file, then non-None ``overrides`` (CLI flags)."""
    values = read_options(path, DistillConfig)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("text_range", "image_range", "preset_steps", "default_scales"):
        if name in values:
            values[name] = tuple(values[name])
    for required in ("teacher", "data", "output"):
        if not values.get(required):
            raise InputError(f"--{required} is required (or set it in the config file)")
    return DistillConfig(**values)


def make_student(teacher_unet: torch.nn.Module, embedding_dim: int) -> torch.nn.Module:
    """The teacher's UNet taking ``timestep_cond`` of 2 * ``embedding_dim`` features, its weights the teacher's and
    the new projection zero: before training it predicts what the teacher's (instruction, image) branch does."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 2 * embedding_dim})
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"student and teacher differ beyond the scale projection: {missing}, {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher_unet.parameters()).dtype)


def check_teacher(folder: Path) -> None:
    """One line for a teacher the recipe cannot distil: not InstructPix2Pix (read_model_config says so), or a
    student already."""
    if read_model_config(folder).student is not None:
        raise InputError(f"{folder}: a distilled student (it has distillation.json); distil from its teacher instead")


class _Frozen:
    """What both stages read and never train: the data, the VAE's encodings, the text encoder, the noise schedule."""

    def __init__(self, config: DistillConfig, device: torch.device):
        self.data = PairedData(config.data, config.resolution)  # bad data fails before any model loads
        self.source = resolve_model(config.teacher)
        check_teacher(self.source.folder)
        folder = self.source.folder
        self.tokenizer = ClipTokenizer(folder / "tokenizer")
        vae = load_component(self.source, "vae").requires_grad_(False).to(device)
        self.text_encoder = load_component(self.source, "text_encoder").requires_grad_(False).to(device)
        self.scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.acp = torch.from_numpy(alphas_cumprod(self.scheduler)).to(device)  # (T,)
        self.prediction_type = self.scheduler.get("prediction_type", "epsilon")
        self.scaling, self.device = float(vae.config.scaling_factor), device
        self.encoder = PairEncoder(vae, device, config.latent_cache_mb)
        with torch.no_grad():
            self.null = self._text([""])  # (1, 77, D)

    def _text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(torch.from_numpy(self.tokenizer(prompts)).to(self.device))[0]

    @torch.no_grad()
    def batch(self, examples: list[dict], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scaled latents of the edited images, a fresh sample; the inputs' latent modes; the instructions)."""
        mean, std, image_latents = self.encoder(examples)
        latents = (mean + std * torch.randn(mean.shape, generator=gen).to(self.device)) * self.scaling
        return latents, image_latents, self._text([e["prompt"] for e in examples])

    def x0(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a UNet output at x_t (DDPM-scaled), in the teacher's parametrisation."""
        a, s = _coefficients(self.acp, t)
        if self.prediction_type == "epsilon":
            return (x - s * out) / a, out
        return a * x - s * out, s * x + a * out  # v-prediction


def _coefficients(acp: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = acp[t].sqrt()[:, None, None, None]
    return a, (1 - acp[t]).sqrt()[:, None, None, None]


def _scales(config: DistillConfig, count: int, gen: torch.Generator, device) -> torch.Tensor:
    """(count, 2) (s_T, s_I) drawn uniformly from the configured ranges."""
    u = torch.rand(count, 2, generator=gen)
    lo = torch.tensor([config.text_range[0], config.image_range[0]])
    hi = torch.tensor([config.text_range[1], config.image_range[1]])
    return (lo + u * (hi - lo)).to(device)


def _student_out(unet, x, image_latents, t, text, scales, dim) -> torch.Tensor:
    cond = scale_embedding(scales, dim).to(x.dtype)
    return unet(torch.cat([x, image_latents], 1), t, text, timestep_cond=cond).sample


def _teacher_rows(teacher, frozen: _Frozen, x, image_latents, t, text) -> tuple[torch.Tensor, ...]:
    """The teacher's (instruction, image), ("", image), ("", zero) rows at x_t."""
    null = frozen.null.expand(len(x), -1, -1)
    rows = torch.cat([torch.cat([x, image_latents], 1), torch.cat([x, image_latents], 1),
                      torch.cat([x, torch.zeros_like(image_latents)], 1)])
    return teacher(rows, t.repeat(3), torch.cat([text, null, null])).sample.chunk(3)


def _guided(rows: tuple[torch.Tensor, ...], scales: torch.Tensor) -> torch.Tensor:
    """Eq. 3 over the teacher's three rows at each example's (s_T, s_I)."""
    return combine_guidance(*rows, scales[:, 0, None, None, None], scales[:, 1, None, None, None])


def _teacher_out(teacher, frozen: _Frozen, x, image_latents, t, text, scales) -> torch.Tensor:
    """The teacher's guided prediction at x_t (eq. 3 over its three rows)."""
    return _guided(_teacher_rows(teacher, frozen, x, image_latents, t, text), scales)


def guidance_loss(frozen: _Frozen, teacher, config: DistillConfig) -> Callable:
    """Stage 1: the student's one row against the teacher's eq. 3 over its three rows, at random t and scales.

    With ``image_term_weight`` w > 0 each example is also run at a second image scale s_I' (same s_T), and the loss
    adds w times the error of the difference of the two predictions against the teacher's, (s_I - s_I') times
    (image branch - unconditional branch): the image term alone, which eq. 3's error otherwise drowns under the
    text term's (the first students reproduced about a third of it). One more student row per example."""

    def loss(student, examples: list[dict], gen: torch.Generator) -> torch.Tensor:
        latents, image_latents, text = frozen.batch(examples, gen)
        b, device = len(latents), frozen.device
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, frozen.acp.shape[0], (b,), generator=gen).to(device)
        a, s = _coefficients(frozen.acp, t)
        noisy = a * latents + s * noise
        scales = _scales(config, b, gen, device)
        with torch.no_grad():
            rows = _teacher_rows(teacher, frozen, noisy, image_latents, t, text)
        target = _guided(rows, scales)
        if config.image_term_weight <= 0:
            pred = _student_out(student, noisy, image_latents, t, text, scales, config.embedding_dim)
            return F.mse_loss(pred.float(), target.float())
        other = torch.stack([scales[:, 0], _scales(config, b, gen, device)[:, 1]], 1)
        target_other = _guided(rows, other)
        both = _student_out(student, noisy.repeat(2, 1, 1, 1), image_latents.repeat(2, 1, 1, 1), t.repeat(2),
                            text.repeat(2, 1, 1), torch.cat([scales, other]), config.embedding_dim).float()
        pred, pred_other = both.chunk(2)
        term = F.mse_loss(pred - pred_other, (target - target_other).float())
        return F.mse_loss(both, torch.cat([target, target_other]).float()) + config.image_term_weight * term

    return loss


@torch.no_grad()
def scale_response(frozen: _Frozen, teacher, student, config: DistillConfig, batches: int = 4,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """How much of eq. 3's two terms a student's one row reproduces, at random t on ``batches`` batches of the data:
    for each scale, the change of the student's prediction from its range's low end to its high end (the other
    scale in the middle of its range) against the teacher's term over the same change, s_T's (instruction branch -
    image branch) or s_I's (image branch - unconditional branch). Per term: the mean cosine similarity and the
    median ratio of norms (1 and 1 for a perfect student, 0 and 0 for one blind to the scale)."""
    ranges = {"text": config.text_range, "image": config.image_range}
    found: dict[str, dict[str, list]] = {term: {"cosine": [], "norm_ratio": []} for term in ranges}
    cursor, dim = DataCursor(len(frozen.data), seed), config.embedding_dim
    middle = [sum(config.text_range) / 2, sum(config.image_range) / 2]
    for index in range(batches):
        rng = np.random.default_rng([seed, index])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        latents, image_latents, text = frozen.batch(next_batch(frozen.data, cursor, config.batch_size, rng), gen)
        b = len(latents)
        t = torch.randint(0, frozen.acp.shape[0], (b,), generator=gen).to(frozen.device)
        a, s = _coefficients(frozen.acp, t)
        noisy = a * latents + s * torch.randn(latents.shape, generator=gen).to(frozen.device)
        cond, image, uncond = _teacher_rows(teacher, frozen, noisy, image_latents, t, text)
        for column, (term, (lo, hi)) in enumerate(ranges.items()):
            ends = []
            for value in (lo, hi):
                scales = torch.tensor([middle[:column] + [value] + middle[column + 1:]] * b, device=frozen.device)
                ends.append(_student_out(student, noisy, image_latents, t, text, scales, dim).float())
            got = (ends[1] - ends[0]).flatten(1)  # (b, C*H*W)
            want = ((hi - lo) * ((cond - image) if term == "text" else (image - uncond))).float().flatten(1)
            found[term]["cosine"] += F.cosine_similarity(got, want).tolist()
            found[term]["norm_ratio"] += (got.norm(dim=1) / want.norm(dim=1).clamp(min=1e-12)).tolist()
    return {term: {"cosine": float(np.mean(v["cosine"])), "norm_ratio": float(np.median(v["norm_ratio"]))}
            for term, v in found.items()}


def _boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip, c_out at timesteps ``t`` (1 and 0 at t = 0)."""
    scaled = (t.float() * TIMESTEP_SCALING)[:, None, None, None]
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2).sqrt()


def consistency_loss(frozen: _Frozen, guided_teacher: Callable, target_net, config: DistillConfig) -> Callable:
    """Stage 2: the consistency function at t_{n+1} against the target network's at t_n, t_n reached by one DDIM
    step of ``guided_teacher(x, image_latents, t, text, scales)``, on the grid of ``original_inference_steps``
    timesteps."""
    total = frozen.acp.shape[0]
    skip = total // config.original_inference_steps
    grid = torch.arange(1, config.original_inference_steps + 1) * skip - 1  # 19, 39, ..., 999 for 50 of 1000

    def loss(student, examples: list[dict], gen: torch.Generator) -> torch.Tensor:
        latents, image_latents, text = frozen.batch(examples, gen)
        b, device, dim = len(latents), frozen.device, config.embedding_dim
        start = grid[torch.randint(0, len(grid), (b,), generator=gen)].to(device)
        prev = (start - skip).clamp(min=0)
        a, s = _coefficients(frozen.acp, start)
        x = a * latents + s * torch.randn(latents.shape, generator=gen).to(device)
        scales = _scales(config, b, gen, device)
        skip_now, out_now = _boundary(start)
        x0 = frozen.x0(_student_out(student, x, image_latents, start, text, scales, dim), x, start)[0]
        pred = skip_now * x + out_now * x0
        with torch.no_grad():
            x0_t, eps_t = frozen.x0(guided_teacher(x, image_latents, start, text, scales), x, start)
            a_prev, s_prev = _coefficients(frozen.acp, prev)
            x_prev = a_prev * x0_t + s_prev * eps_t  # DDIM (eta 0) from start to prev
            x0_prev = frozen.x0(_student_out(target_net, x_prev, image_latents, prev, text, scales, dim), x_prev, prev)[0]
            skip_prev, out_prev = _boundary(prev)
            target = skip_prev * x_prev + out_prev * x0_prev
        c = config.huber_c
        return (torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c).mean()

    return loss


@dataclass
class _Stage:
    """One stage's training: ``loss(student, examples, gen)``; ``follow(student)`` after every optimiser step
    (stage 2's target network); ``extra`` modules checkpointed beside the student."""

    name: str
    steps: int
    loss: Callable
    follow: Callable | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def _run_stage(stage: _Stage, student, config: DistillConfig, accelerator, frozen: _Frozen, output: Path,
               resume: str | None, progress: bool):
    """Train ``student`` through ``stage``; its final (EMA) weights, also saved in <output>/<stage>/unet."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    folder = output / stage.name
    optimizer = torch.optim.AdamW(_parameter_groups(student, config), lr=config.lr,
                                  weight_decay=config.adam_weight_decay)
    lr_schedule = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                num_training_steps=max(stage.steps, 1))
    ema = EMAModel(student.parameters(), decay=config.ema_decay, use_ema_warmup=True) if config.ema_decay > 0 else None
    cursor, step = DataCursor(len(frozen.data), config.seed), 0
    if _resumes(folder, resume):
        step = _load_checkpoint(_resume_path(folder, resume), student, optimizer, lr_schedule, ema, cursor, stage.extra)
    student, optimizer, lr_schedule = accelerator.prepare(student, optimizer, lr_schedule)
    if ema is not None:
        ema.to(accelerator.device)
    bar = tqdm(total=stage.steps, initial=step, desc=f"distill: {stage.name}", unit="step", disable=not progress)
    started, first, losses = time.perf_counter(), step, []
    while step < stage.steps:
        rng = np.random.default_rng([config.seed, STAGES.index(stage.name), step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        examples = next_batch(frozen.data, cursor, config.batch_size, rng)
        with accelerator.autocast():
            loss = stage.loss(student, examples, gen)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        step += 1
        unwrapped = accelerator.unwrap_model(student)
        if ema is not None:
            ema.step(unwrapped.parameters())
        if stage.follow is not None:
            stage.follow(unwrapped)
        losses.append(loss.detach().item())
        rate = (step - first) * config.batch_size / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", img_per_s=f"{rate:.1f}")
        bar.update()
        if config.log_every and step % config.log_every == 0:
            _log_row(folder, step, float(np.mean(losses[-config.log_every:])), lr_schedule.get_last_lr()[0], rate)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < stage.steps:
            _save_checkpoint(accelerator, folder, step, student, optimizer, lr_schedule, ema, cursor, config,
                             stage.extra)
    bar.close()
    final = accelerator.unwrap_model(student)
    if ema is not None:
        ema.copy_to(final.parameters())
    _save_stage(final, folder, {"steps": stage.steps, "from_step": first,  # > 0: resumed, the seconds are this run's
                                "seconds": round(time.perf_counter() - started, 1),
                                "images_per_second": round(rate, 2) if step > first else None,
                                "final_loss": float(np.mean(losses[-20:])) if losses else None})
    return final


def _parameter_groups(student, config: DistillConfig) -> list[dict]:
    """The student's parameters, the scale embedding's (``time_embedding.cond_proj``) at ``scale_lr_scale`` x lr
    (one group where that is 1, as before the option: checkpoints of earlier runs resume)."""
    if config.scale_lr_scale == 1:
        return [{"params": list(student.parameters())}]
    scale = [p for name, p in student.named_parameters() if name.startswith("time_embedding.cond_proj.")]
    rest = [p for name, p in student.named_parameters() if not name.startswith("time_embedding.cond_proj.")]
    return [{"params": rest}, {"params": scale, "lr": config.lr * config.scale_lr_scale}]


def _resumes(folder: Path, resume: str | None) -> bool:
    """Whether ``resume`` ("latest" or a checkpoint folder) applies to the stage in ``folder``: "latest" where the
    stage has a checkpoint, a folder where it is one of this stage's."""
    if resume == "latest":
        return bool(_checkpoint_paths(folder))
    return resume is not None and Path(resume).resolve().parent == (folder / CHECKPOINTS).resolve()


def _save_stage(unet, folder: Path, report: dict) -> None:
    """<folder>/unet and stage.json (written last: a stage counts as finished only with it)."""
    unet.save_pretrained(folder / "unet")
    write_json_atomic(folder / "stage.json", report)


def _stage_report(folder: Path) -> dict | None:
    path = folder / "stage.json"
    return json.loads(path.read_text()) if path.is_file() and (folder / "unet").is_dir() else None


def _guided_teacher(config: DistillConfig, frozen: _Frozen, teacher, guided) -> Callable:
    """Stage 2's guided teacher ``(x, image_latents, t, text, scales) -> prediction``: the teacher's eq. 3 over its
    three rows, or (``consistency_teacher: guidance``) a frozen copy of stage 1's student, one row."""
    if config.consistency_teacher == "teacher":
        return lambda x, image_latents, t, text, scales: _teacher_out(teacher, frozen, x, image_latents, t, text,
                                                                      scales)
    student = copy.deepcopy(guided).requires_grad_(False).eval()
    return lambda x, image_latents, t, text, scales: _student_out(student, x, image_latents, t, text, scales,
                                                                  config.embedding_dim)


def distill(config: DistillConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Distil ``config.teacher`` into a student (module docstring); write it to ``config.output`` as a diffusers
    folder that diffusers loads and the engine runs at one UNet row a step."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    output = Path(config.output)
    if resume not in (None, "latest") and not any(_resumes(output / stage, resume) for stage in STAGES):
        raise InputError(f"--resume {resume}: not a checkpoint of {output} (expected {output}/<stage>/{CHECKPOINTS}/"
                         "step-N) nor 'latest'")
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    frozen = _Frozen(config, device)
    teacher = load_component(frozen.source, "unet").requires_grad_(False).eval().to(device)
    if _stage_report(output / "guidance") is None:
        student = make_student(teacher, config.embedding_dim).to(device).train()
        guided = _run_stage(_Stage("guidance", config.guidance_steps, guidance_loss(frozen, teacher, config)),
                            student, config, accelerator, frozen, output, resume, progress)
    else:
        log.info("%s: finished, skipped", output / "guidance")
        guided = UNet2DConditionModel.from_pretrained(output / "guidance" / "unet").to(device)
    if not (output / "guidance" / "model" / "distillation.json").is_file():
        save_student(frozen, guided, output / "guidance" / "model", config, consistency=False)
    guided_teacher = _guided_teacher(config, frozen, teacher, guided)
    del teacher  # held on by guided_teacher only where stage 2 learns from it
    target = copy.deepcopy(guided).requires_grad_(False).eval()

    def follow(student) -> None:  # the target network: a slow EMA of the student
        with torch.no_grad():
            for kept, new in zip(target.parameters(), student.parameters()):
                kept.lerp_(new, 1 - config.target_decay)

    if _stage_report(output / "consistency") is None:
        stage = _Stage("consistency", config.consistency_steps,
                       consistency_loss(frozen, guided_teacher, target, config), follow, {"target": target})
        final = _run_stage(stage, guided.train(), config, accelerator, frozen, output, resume, progress)
    else:
        final = UNet2DConditionModel.from_pretrained(output / "consistency" / "unet")
    save_student(frozen, final, output, config)
    return output


GUIDANCE_ONLY = ("euler_ancestral", (20, 12, 8))  # stage 1's student: the teacher's sampler and step counts


def save_student(frozen: _Frozen, unet, output: Path, config: DistillConfig, consistency: bool = True) -> None:
    """The diffusers folder: the teacher's frozen parts, the student's UNet, its scheduler (an LCMScheduler over the
    teacher's noise schedule; stage 1's alone keeps the teacher's sampler) and distillation.json (written last)
    that tells the engine what the UNet takes."""
    copy_frozen_parts(frozen.source, output)
    unet.save_pretrained(output / "unet")
    kind = "LCMScheduler" if consistency else "EulerAncestralDiscreteScheduler"
    scheduler = {**frozen.scheduler, "_class_name": kind}
    if consistency:
        scheduler |= {"original_inference_steps": config.original_inference_steps, "timestep_scaling": TIMESTEP_SCALING}
    (output / "scheduler").mkdir(exist_ok=True)
    write_json_atomic(output / "scheduler" / "scheduler_config.json", scheduler)
    index_path = frozen.source.folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index.update({"_class_name": "StableDiffusionInstructPix2PixPipeline",
                  "scheduler": ["diffusers", kind], "unet": ["diffusers", "UNet2DConditionModel"],
                  "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                  "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
                  "feature_extractor": [None, None], "requires_safety_checker": False})
    write_json_atomic(output / "model_index.json", index)
    if config.save_dtype == "float16":
        save_half_precision(output)
    stages = {name: _stage_report(Path(config.output) / name) for name in STAGES}
    write_json_atomic(output / "training_config.json", {"config": dataclasses.asdict(config), "stages": stages})
    sampler, steps = ("lcm", config.preset_steps) if consistency else GUIDANCE_ONLY
    scales = {"scales": list(config.default_scales)} if consistency else {}  # stage 1's: the teacher's
    write_json_atomic(output / "distillation.json", {
        "embedding_dim": config.embedding_dim, "text_range": list(config.text_range),
        "image_range": list(config.image_range), "sampler": sampler, "steps": list(steps), **scales,
        "teacher": str(config.teacher), "stages": stages})
