"""Noise schedules: which sigmas a sampler visits and which UNet timestep each one means.

Pure numpy functions of a diffusers scheduler config (the model's ``scheduler/scheduler_config.json``),
so the same schedule drives every backend. Sigmas live in k-diffusion's parametrisation
``x = x0 + sigma * eps`` (Karras et al. 2022), i.e. the DDPM sample divided by sqrt(alpha_bar).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.errors import InputError


@dataclass(frozen=True)
class Schedule:
    """Sigmas to visit (``steps + 1``, descending, last is where sampling ends) and their timesteps."""

    sigmas: np.ndarray  # (steps + 1,) float32
    timesteps: np.ndarray  # (steps,) float32, UNet timestep for sigmas[i]
    init_noise_sigma: float  # unit-variance noise is multiplied by this to start sampling

    def timestep(self, sigma: float) -> float:
        """The UNet timestep of one of this schedule's sigmas."""
        hits = np.flatnonzero(self.sigmas[:-1] == sigma)
        if hits.size == 0:
            raise KeyError(f"sigma {sigma!r} is not on this schedule")
        return float(self.timesteps[hits[0]])


def alphas_cumprod(config: dict) -> np.ndarray:
    """alpha_bar_t for t = 0..T-1 from a diffusers scheduler config, in float32 as diffusers computes it."""
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif kind == "linear":
        betas = np.linspace(start, end, steps, dtype=np.float32)
    elif kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, steps, dtype=np.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
            dtype=np.float32,
        )
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    return np.cumprod(1.0 - betas, dtype=np.float32)


def training_sigmas(config: dict) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep, ascending in t."""
    acp = alphas_cumprod(config)
    return ((1 - acp) / acp) ** 0.5


def spaced_timesteps(config: dict, steps: int, spacing: str, integer: bool) -> np.ndarray:
    """Descending timesteps per the "linspace" / "leading" / "trailing" spacings (Lin et al. 2023, table 2)."""
    total = int(config.get("num_train_timesteps", 1000))
    if spacing == "linspace":
        t = np.linspace(0, total - 1, steps, dtype=np.float64 if integer else np.float32)
        t = t.round() if integer else t
        return t[::-1].astype(np.float32)
    if spacing == "leading":
        ratio = total // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + int(config.get("steps_offset", 0))
    if spacing == "trailing":
        return (np.arange(total, 0, -total / steps).round() - 1).astype(np.float32)
    raise ValueError(f"unsupported timestep_spacing {spacing!r}")


def euler_schedule(config: dict, steps: int) -> Schedule:
    """Sigmas interpolated linearly in t at the spaced timesteps, then 0 (diffusers' Euler schedulers)."""
    spacing = config.get("timestep_spacing", "linspace")
    timesteps = spaced_timesteps(config, steps, spacing, integer=False)
    train = training_sigmas(config)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    top = float(sigmas.max())
    init = top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Schedule(sigmas=sigmas, timesteps=timesteps, init_noise_sigma=init)


def sigma_to_timestep(sigma: float, train_sigmas: np.ndarray) -> float:
    """Fractional timestep whose sigma is ``sigma``, by interpolation in log-sigma (k-diffusion)."""
    log_sigmas = np.log(train_sigmas)
    log_sigma = math.log(sigma)
    low = int(np.clip(np.sum(log_sigmas <= log_sigma) - 1, 0, len(log_sigmas) - 2))
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return float((1 - w) * low + w * (low + 1))


def karras_schedule(config: dict, steps: int, rho: float = 7.0) -> Schedule:
    """Karras et al. (2022) eq. 5 sigmas between the model's extremes; timesteps rounded as DPM-Solver does."""
    train = training_sigmas(config)
    sigma_min, sigma_max = float(train[0]), float(train[-1])
    ramp = np.linspace(0, 1, steps)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    timesteps = np.array([sigma_to_timestep(s, train) for s in sigmas]).round().astype(np.float32)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return Schedule(sigmas=sigmas, timesteps=timesteps, init_noise_sigma=float((sigma_max**2 + 1) ** 0.5))


def multistep_schedule(config: dict, steps: int) -> Schedule:
    """The integer timesteps of diffusers' multistep solvers (UniPC, and DPM-Solver without Karras sigmas):
    "linspace" and "leading" space ``steps + 1`` and drop the last, then sigma 0."""
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "trailing":
        timesteps = spaced_timesteps(config, steps, spacing, integer=True)
    else:
        timesteps = spaced_timesteps(config, steps + 1, spacing, integer=True)[:-1]
    train = training_sigmas(config)
    sigmas = np.concatenate([train[timesteps.astype(np.int64)], [0.0]]).astype(np.float32)
    return Schedule(sigmas=sigmas, timesteps=timesteps, init_noise_sigma=float((sigmas[0] ** 2 + 1) ** 0.5))


def lcm_schedule(config: dict, steps: int) -> Schedule:
    """Latent Consistency Models' timesteps: ``steps`` of the ``original_inference_steps`` (50) evenly spaced
    training timesteps a model was distilled on, taken at evenly spaced indices from the top (diffusers'
    LCMScheduler); then sigma 0."""
    total, original = int(config.get("num_train_timesteps", 1000)), int(config.get("original_inference_steps", 50))
    if steps > original:
        raise InputError(f"the lcm sampler takes at most {original} steps (the model's original_inference_steps), "
                         f"got {steps}")
    origin = (np.arange(1, original + 1) * (total // original) - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, original, steps, endpoint=False)).astype(np.int64)]
    train = training_sigmas(config)
    sigmas = np.concatenate([train[timesteps], [0.0]]).astype(np.float32)
    return Schedule(sigmas=sigmas, timesteps=timesteps.astype(np.float32),
                    init_noise_sigma=float((sigmas[0] ** 2 + 1) ** 0.5))


def ddim_schedule(config: dict, steps: int) -> Schedule:
    """DDIM's integer timesteps (Song et al. 2021); it ends at alpha_bar = 1 (sigma 0) or alpha_bar_0."""
    spacing = config.get("timestep_spacing", "leading")
    timesteps = spaced_timesteps(config, steps, spacing, integer=True)
    train = training_sigmas(config)
    final = 0.0 if config.get("set_alpha_to_one", True) else float(train[0])
    sigmas = np.concatenate([train[timesteps.astype(np.int64)], [final]]).astype(np.float32)
    return Schedule(sigmas=sigmas, timesteps=timesteps, init_noise_sigma=float((sigmas[0] ** 2 + 1) ** 0.5))
