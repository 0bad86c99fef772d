"""Samplers as plain step functions over a denoiser (k-diffusion's samplers, turned inside out).

A sampler is a generator: it yields ``(x, sigma)``, the sample it needs denoised, is sent back
``denoised = D(x, sigma)``, and returns the final sample. It holds its own history (an edit's sampler
state) and knows no model, so one loop can step many edits, each with its own sampler, and batch their
model calls; ``drive`` runs one to the end with a plain ``model(x, sigma)`` (the k-diffusion contract).
``x`` is any array type supporting arithmetic with Python floats (torch tensors, numpy arrays).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generator

from engine import schedules

Denoiser = Callable[[Any, float], Any]
NoiseSampler = Callable[[], Any]  # unit-variance noise shaped like x
Callback = Callable[[int, Any, Any], None]
Steps = Generator[tuple[Any, float], Any, Any]  # yields (x, sigma), is sent D(x, sigma), returns the sample


def drive(steps: Steps, model: Denoiser, callback: Callback | None = None) -> Any:
    """Run a sampler's ``steps`` to the end with a plain ``model`` (k-diffusion's way, for a caller with one
    denoiser, e.g. ``engine.guidance.guided_denoiser``; the engine's own loop is ``engine.denoising``);
    ``callback(i, x, denoised)`` after each step."""
    i, (x, sigma) = 0, next(steps)
    while True:
        denoised = model(x, sigma)
        try:
            x, sigma = steps.send(denoised)
        except StopIteration as finished:
            if callback is not None:
                callback(i, finished.value, denoised)
            return finished.value
        if callback is not None:
            callback(i, x, denoised)
        i += 1


def euler(x: Any, sigmas) -> Steps:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (Karras et al. 2022, alg. 1)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield x, sigma
        x = x + (x - denoised) / sigma * (sigma_next - sigma)  # (B, C, H, W)
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step to sigma_next into a deterministic part down to sigma_down and fresh noise sigma_up."""
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def euler_ancestral(x: Any, sigmas, noise_sampler: NoiseSampler, eta: float = 1.0) -> Steps:
    """Ancestral Euler: an Euler step to sigma_down, then noise of std sigma_up (the paper's sampler)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield x, sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler() * sigma_up
    return x


def multistep_denoised(denoised: Any, old_denoised: Any, sigmas, i: int, h: float) -> Any:
    """DPM-Solver++(2M)'s second-order estimate from this step's and the last step's denoised predictions,
    D + (D - D_prev) / (2 r) with r the last step's log-sigma span over this one's; first order (D) at the
    first step."""
    if old_denoised is None:
        return denoised
    r = (math.log(float(sigmas[i - 1])) - math.log(float(sigmas[i]))) / h
    return denoised + (denoised - old_denoised) * (0.5 / r)


def dpmpp_2m(x: Any, sigmas) -> Steps:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in log-sigma time; first order on the first and last step."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = multistep_denoised(denoised, old_denoised, sigmas, i, h)
            x = x * (sigma_next / sigma) - d * math.expm1(-h)
        old_denoised = denoised
    return x


def dpmpp_2m_sde(x: Any, sigmas, noise_sampler: NoiseSampler) -> Steps:
    """DPM-Solver++(2M) SDE: the second-order multistep data-prediction solver of the reverse SDE (Lu et al.
    2022), midpoint form, as diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"); with
    h = log(sigma / sigma_next), x keeps exp(-2h) of itself, and fresh noise of std sigma_next sqrt(1 - exp(-2h))
    replaces what the deterministic step would have kept. First order on the first and last step."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield x, sigma
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = multistep_denoised(denoised, old_denoised, sigmas, i, h)
            kept = -math.expm1(-2 * h)  # 1 - exp(-2h)
            x = x * (sigma_next / sigma * math.exp(-h)) + d * kept + noise_sampler() * (sigma_next * kept**0.5)
        old_denoised = denoised
    return x


def unipc_correct(x_prev: Any, denoised: Any, history: list[Any], sigmas, i: int) -> Any:
    """UniC, UniPC's corrector (Zhao et al. 2023, alg. 2, B(h) = e^h - 1 "bh2", data prediction): redo the
    step from sigmas[i - 1] to sigmas[i] that produced the current sample, now that the model has been
    evaluated there (``denoised``), with the predictions of the steps before it (``history``, newest last:
    one gives order 1, the trapezoidal rule; two give order 2). ``x_prev`` is the sample that step started
    from. Reuses the evaluation: no extra model call."""
    sigma_prev, sigma = float(sigmas[i - 1]), float(sigmas[i])
    h = math.log(sigma_prev) - math.log(sigma)  # log-SNR step, lambda = -log(sigma)
    phi = math.expm1(-h)  # h phi_1(h) in data prediction, and B(h)
    x = x_prev * (sigma / sigma_prev) - history[-1] * phi
    d_now = denoised - history[-1]
    if len(history) == 1:
        return x - d_now * (0.5 * phi)
    r = (math.log(sigma_prev) - math.log(float(sigmas[i - 2]))) / h  # the older point's offset, in units of h
    b1 = (phi / -h - 1) / phi  # b_k = h phi_k(h) k! / B(h), k = 1, 2
    b2 = ((phi / -h - 1) / -h - 0.5) * 2 / phi
    rho_old = (b1 - b2) / (1 - r)  # R rho = b, R = [[1, 1], [r, 1]]
    rho_now = b1 - rho_old
    return x - ((history[-2] - history[-1]) * (rho_old / r) + d_now * rho_now) * phi


def lcm(x: Any, sigmas, noise_sampler: NoiseSampler, timesteps, timestep_scaling: float = 10.0) -> Steps:
    """Latent Consistency Models' multistep sampler (Luo et al. 2023, alg. 3), as diffusers' LCMScheduler: each
    step takes the consistency function's output, the prediction D kept with c_out and the DDPM-scaled sample
    with c_skip (their boundary condition, sigma_data 0.5, at timestep * ``timestep_scaling``), and noises it
    afresh to the next sigma; the last step returns it. For a model distilled to it (few steps)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield x, sigma
        scaled = float(timesteps[i]) * timestep_scaling
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        x = denoised * c_out + x * (c_skip / (sigma**2 + 1) ** 0.5)  # the DDPM sample is x / sqrt(sigma^2 + 1)
        if sigma_next > 0:
            x = x + noise_sampler() * sigma_next
    return x


def unipc(x: Any, sigmas) -> Steps:
    """UniPC (Zhao et al. 2023), order 2, "bh2", as diffusers' UniPCMultistepScheduler: each step first
    corrects the sample it is at with the model's prediction there (UniC), then predicts the next one
    (UniP, of order 2 equal to DPM-Solver++(2M)'s step). First order on the first and last step."""
    history: list[Any] = []  # denoised predictions of the last two steps, newest last
    x_prev = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = yield x, sigma
        if history:
            x = unipc_correct(x_prev, denoised, history, sigmas, i)
        x_prev = x
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            last = i == len(sigmas) - 2
            d = denoised if last or not history else multistep_denoised(denoised, history[-1], sigmas, i, h)
            x = x * (sigma_next / sigma) - d * math.expm1(-h)
        history = (history + [denoised])[-2:]
    return x


@dataclass(frozen=True)
class Sampler:
    steps: Callable[..., Steps]  # steps(x, sigmas, **arguments(...)): the sampler's generator
    schedule: Callable[[dict, int], schedules.Schedule]
    stochastic: bool  # takes a noise_sampler
    uses_timesteps: bool = False  # takes the schedule's timesteps

    def arguments(self, schedule: schedules.Schedule, noise_sampler: NoiseSampler) -> dict[str, Any]:
        """What ``steps`` takes besides x and the sigmas."""
        extra: dict[str, Any] = {"noise_sampler": noise_sampler} if self.stochastic else {}
        return extra | ({"timesteps": schedule.timesteps} if self.uses_timesteps else {})

    def sample(self, model: Denoiser, x: Any, sigmas, callback: Callback | None = None, **extra: Any) -> Any:
        """The whole trajectory from ``x`` at sigmas[0] with ``model`` (``extra``: the noise_sampler)."""
        return drive(self.steps(x, sigmas, **extra), model, callback)


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(euler, schedules.euler_schedule, stochastic=False),
    "euler_ancestral": Sampler(euler_ancestral, schedules.euler_schedule, stochastic=True),
    "dpmpp_2m": Sampler(dpmpp_2m, schedules.karras_schedule, stochastic=False),
    "dpmpp_2m_sde": Sampler(dpmpp_2m_sde, schedules.karras_schedule, stochastic=True),
    "unipc": Sampler(unipc, schedules.multistep_schedule, stochastic=False),
    # Deterministic DDIM (eta = 0) is exactly an Euler step in sigma space (Karras et al. 2022, sec. 3);
    # what makes it DDIM is its schedule of integer timesteps.
    "ddim": Sampler(euler, schedules.ddim_schedule, stochastic=False),
    "lcm": Sampler(lcm, schedules.lcm_schedule, stochastic=True, uses_timesteps=True),
}
