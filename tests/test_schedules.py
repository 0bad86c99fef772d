import numpy as np
import pytest
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       UniPCMultistepScheduler)

from engine import schedules
from engine.random_models import SD15_SCHEDULER


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_euler_schedule_matches_diffusers(cls, spacing, steps):
    config = {**SD15_SCHEDULER, "timestep_spacing": spacing}
    ref = cls.from_config(config)
    ref.set_timesteps(steps)
    ours = schedules.euler_schedule(config, steps)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-5)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("steps", [5, 20, 50])
def test_karras_schedule_matches_dpm_solver(steps):
    ref = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER, use_karras_sigmas=True)
    ref.set_timesteps(steps)
    ours = schedules.karras_schedule(SD15_SCHEDULER, steps)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("cls", [UniPCMultistepScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("steps", [1, 6, 20])
def test_multistep_schedule_matches_diffusers(cls, spacing, steps):
    config = {**SD15_SCHEDULER, "timestep_spacing": spacing}
    ref = cls.from_config(config)
    ref.set_timesteps(steps)
    ours = schedules.multistep_schedule(config, steps)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_schedule_matches_diffusers_timesteps(spacing, alpha_to_one):
    config = {**SD15_SCHEDULER, "timestep_spacing": spacing, "set_alpha_to_one": alpha_to_one}
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(10)
    ours = schedules.ddim_schedule(config, 10)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    acp = ref.alphas_cumprod.numpy()
    expected = np.sqrt((1 - acp[ref.timesteps.numpy()]) / acp[ref.timesteps.numpy()])
    np.testing.assert_allclose(ours.sigmas[:-1], expected, rtol=1e-5)
    final_alpha = float(ref.final_alpha_cumprod)
    assert ours.sigmas[-1] == pytest.approx(((1 - final_alpha) / final_alpha) ** 0.5, abs=1e-7)


def test_timestep_lookup_is_exact_and_refuses_foreign_sigmas():
    schedule = schedules.euler_schedule(SD15_SCHEDULER, 10)
    for sigma, t in zip(schedule.sigmas[:-1], schedule.timesteps):
        assert schedule.timestep(float(sigma)) == float(t)
    with pytest.raises(KeyError):
        schedule.timestep(123.456)


def test_alphas_cumprod_schedules():
    linear = schedules.alphas_cumprod({"beta_schedule": "linear", "num_train_timesteps": 1000})
    cosine = schedules.alphas_cumprod({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
    assert linear.shape == cosine.shape == (1000,)
    assert np.all(np.diff(linear) < 0) and np.all(np.diff(cosine) <= 0)
    with pytest.raises(ValueError, match="beta_schedule"):
        schedules.alphas_cumprod({"beta_schedule": "nope"})
