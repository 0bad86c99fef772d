import numpy as np
import pytest
import torch

from engine.guidance import combine_guidance, guided_denoiser, uses_guidance


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    from engine.random_models import ARCHITECTURES

    torch.manual_seed(0)
    return UNet2DConditionModel(**ARCHITECTURES["tiny"]["unet"]).eval()


def test_batched_guidance_equals_three_separate_calls(unet):
    """One batch-3B call + eq. 3 == three batch-B calls combined by hand."""
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 8, 12
    x = torch.randn(b, 4, h, w, generator=g)
    image = torch.randn(b, 4, h, w, generator=g)
    text, null = torch.randn(b, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g).expand(b, -1, -1)
    t, s_t, s_i = 500.0, 7.5, 1.5

    def call(latent_image, embeds):
        with torch.no_grad():
            return unet(torch.cat([x, latent_image], 1), torch.full((b,), t), embeds).sample

    eps_cond, eps_image, eps_uncond = call(image, text), call(image, null), call(torch.zeros_like(image), null)
    naive = eps_uncond + s_t * (eps_cond - eps_image) + s_i * (eps_image - eps_uncond)

    sample = torch.cat([torch.cat([x] * 3), torch.cat([image, image, torch.zeros_like(image)])], 1)
    with torch.no_grad():
        out = unet(sample, torch.full((3 * b,), t), torch.cat([text, null, null])).sample
    batched = combine_guidance(out[:b], out[b : 2 * b], out[2 * b :], s_t, s_i)
    torch.testing.assert_close(batched, naive, rtol=1e-4, atol=1e-5)


def test_both_scales_one_runs_batch_b_only():
    batches = []

    def unet(x, t):
        batches.append(x.shape[0])
        return np.ones_like(x)

    x = np.zeros((2, 4, 3, 3), dtype=np.float32)
    guided_denoiser(unet, lambda s: 0.0, 1.0, 1.0)(x, 1.0)
    assert batches == [2]
    assert not uses_guidance(1.0, 1.0) and uses_guidance(1.0, 1.5) and uses_guidance(7.5, 1.0)


def test_image_guidance_below_one_keeps_text_guidance():
    """Unlike diffusers, s_I < 1 must not switch text guidance off: the output still depends on s_T."""
    cond, image, uncond = np.full(3, 1.0), np.full(3, 0.5), np.zeros(3)
    low = combine_guidance(cond, image, uncond, text_scale=1.0, image_scale=0.5)
    high = combine_guidance(cond, image, uncond, text_scale=7.5, image_scale=0.5)
    assert not np.allclose(low, high)
    np.testing.assert_allclose(high, 0 + 7.5 * 0.5 + 0.5 * 0.5)


def test_denoiser_three_way_batches_and_v_prediction():
    seen = []

    def unet(x, t):
        seen.append((x.shape[0], t))
        return np.concatenate([np.full((1, 1), 3.0), np.full((1, 1), 2.0), np.full((1, 1), 1.0)])

    x = np.full((1, 1), 4.0)
    denoised = guided_denoiser(unet, lambda s: 42.0, 2.0, 1.5)(x, 3.0)
    eps = combine_guidance(3.0, 2.0, 1.0, 2.0, 1.5)
    assert seen == [(1, 42.0)]  # the UNet callable gets x once; it returns all three branches
    np.testing.assert_allclose(denoised, 4.0 - 3.0 * eps)
    v = guided_denoiser(unet, lambda s: 0.0, 2.0, 1.5, prediction_type="v_prediction")(x, 3.0)
    np.testing.assert_allclose(v, 4.0 / 10 - eps * 3.0 / 10**0.5)
    with pytest.raises(ValueError):
        guided_denoiser(unet, lambda s: 0.0, 1, 1, prediction_type="sample")
