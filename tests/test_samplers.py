"""Whole sampling trajectories against diffusers' schedulers driven by the same analytic model."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       LCMScheduler, UniPCMultistepScheduler)

from engine.errors import InputError
from engine.guidance import COND, GuidancePlan, guided_denoiser
from engine.random_models import SD15_SCHEDULER
from engine.samplers import SAMPLERS, ancestral_step

SHAPE = (2, 4, 6, 5)


def eps_model(x, t):
    """A smooth stand-in for a UNet: depends on the input and the timestep."""
    return 0.6 * torch.tanh(x) + 0.2 * torch.cos(x * 3.0 + float(t) / 300.0)


def unguided(model, timestep_of, count=SHAPE[0]):
    """D(x, sigma) of a model without guidance (both scales 1: the conditional branch alone)."""
    return guided_denoiser(lambda x, t, groups: [{COND: model(x, t)}], timestep_of, GuidancePlan(count, 1.0, 1.0),
                           lambda parts: parts[0])


def run_ours(name, config, steps, noise, step_noise_seed=None):
    sampler = SAMPLERS[name]
    schedule = sampler.schedule(config, steps)
    denoiser = unguided(eps_model, schedule.timestep)
    gen = torch.Generator().manual_seed(step_noise_seed) if sampler.stochastic else None
    extra = sampler.arguments(schedule, lambda: torch.randn(SHAPE, generator=gen))
    x = sampler.sample(denoiser, noise * schedule.init_noise_sigma, schedule.sigmas, **extra)
    return x / (float(schedule.sigmas[-1]) ** 2 + 1) ** 0.5


def run_diffusers(scheduler, steps, noise, step_noise_seed=None):
    scheduler.set_timesteps(steps)
    sample = noise * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(step_noise_seed) if step_noise_seed is not None else None
    for t in scheduler.timesteps:
        eps = eps_model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(eps, t, sample, generator=gen).prev_sample if gen else scheduler.step(eps, t, sample).prev_sample
    return sample


@pytest.fixture
def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_euler_matches_euler_discrete(noise, steps, spacing):
    config = {**SD15_SCHEDULER, "timestep_spacing": spacing}
    ref = run_diffusers(EulerDiscreteScheduler.from_config(config), steps, noise)
    torch.testing.assert_close(run_ours("euler", config, steps, noise), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [2, 10])
def test_euler_ancestral_matches_given_the_same_noise(noise, steps):
    ref = run_diffusers(EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER), steps, noise, step_noise_seed=7)
    ours = run_ours("euler_ancestral", SD15_SCHEDULER, steps, noise, step_noise_seed=7)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [3, 12, 25])
def test_dpmpp_2m_matches_dpm_solver_karras(noise, steps):
    scheduler = DPMSolverMultistepScheduler.from_config(
        SD15_SCHEDULER, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
    )
    ref = run_diffusers(scheduler, steps, noise)
    torch.testing.assert_close(run_ours("dpmpp_2m", SD15_SCHEDULER, steps, noise), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [3, 8, 20])
def test_dpmpp_2m_sde_matches_sde_dpm_solver_karras_given_the_same_noise(noise, steps):
    scheduler = DPMSolverMultistepScheduler.from_config(
        SD15_SCHEDULER, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++", solver_order=2
    )
    ref = run_diffusers(scheduler, steps, noise, step_noise_seed=7)
    ours = run_ours("dpmpp_2m_sde", SD15_SCHEDULER, steps, noise, step_noise_seed=7)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    other = run_ours("dpmpp_2m_sde", SD15_SCHEDULER, steps, noise, step_noise_seed=8)
    assert (other - ref).abs().max() > 1e-3  # the noise matters: the match is not the deterministic solver's


@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_matches_ddim_scheduler(noise, alpha_to_one):
    config = {**SD15_SCHEDULER, "timestep_spacing": "leading", "set_alpha_to_one": alpha_to_one}
    ref = run_diffusers(DDIMScheduler.from_config(config), 10, noise)
    torch.testing.assert_close(run_ours("ddim", config, 10, noise), ref, rtol=1e-4, atol=1e-4)


def test_samplers_run_on_numpy_arrays():
    """The same sampler code drives numpy arrays (the minimal runtime's arrays)."""
    rng = np.random.default_rng(0)
    for name, sampler in SAMPLERS.items():
        schedule = sampler.schedule(SD15_SCHEDULER, 5)
        denoiser = unguided(lambda x, t: np.tanh(x) * 0.5, schedule.timestep)
        extra = sampler.arguments(schedule, lambda: rng.standard_normal(SHAPE).astype(np.float32))
        x = rng.standard_normal(SHAPE).astype(np.float32) * schedule.init_noise_sigma
        out = sampler.sample(denoiser, x, schedule.sigmas, **extra)
        assert isinstance(out, np.ndarray) and out.shape == SHAPE and np.isfinite(out).all(), name


def test_callback_sees_every_step(noise):
    seen = []
    schedule = SAMPLERS["euler"].schedule(SD15_SCHEDULER, 6)
    denoiser = unguided(eps_model, schedule.timestep)
    SAMPLERS["euler"].sample(denoiser, noise, schedule.sigmas, callback=lambda i, x, d: seen.append(i))
    assert seen == list(range(6))


def test_ancestral_step_conserves_variance():
    down, up = ancestral_step(5.0, 2.0)
    assert down**2 + up**2 == pytest.approx(4.0)
    assert ancestral_step(5.0, 2.0, eta=0.0) == (2.0, 0.0)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_unipc_matches_unipc_multistep(noise, steps, spacing):
    config = {**SD15_SCHEDULER, "timestep_spacing": spacing}
    ref = run_diffusers(UniPCMultistepScheduler.from_config(config), steps, noise)
    torch.testing.assert_close(run_ours("unipc", config, steps, noise), ref, rtol=1e-4, atol=1e-4)
    predictor_only = UniPCMultistepScheduler.from_config(config, disable_corrector=list(range(steps)))
    if steps > 2:  # the corrector changes the trajectory (on the last step its correction is dropped, as diffusers does)
        assert (run_diffusers(predictor_only, steps, noise) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("original", [50, 20])
def test_lcm_matches_lcm_scheduler_given_the_same_noise(noise, steps, original):
    config = {**SD15_SCHEDULER, "original_inference_steps": original}
    ref = run_diffusers(LCMScheduler.from_config(config), steps, noise, step_noise_seed=3)
    torch.testing.assert_close(run_ours("lcm", config, steps, noise, step_noise_seed=3), ref, rtol=1e-4, atol=1e-4)


def test_lcm_refuses_more_steps_than_it_was_distilled_on():
    with pytest.raises(InputError, match="at most 50 steps"):
        SAMPLERS["lcm"].schedule(SD15_SCHEDULER, 51)
