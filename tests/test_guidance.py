import numpy as np
import pytest
import torch

from engine.guidance import (ALL, COND, IMAGE, UNCOND, GuidanceOptions, GuidancePlan, branch_weights, combine,
                             combine_guidance, group_images, guided_denoiser, needed_branches)
from engine.errors import InputError


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


@pytest.mark.parametrize("s_t, s_i, needed", [(7.5, 1.5, ALL), (7.5, 1.0, (COND, IMAGE)), (1.5, 1.5, (COND, UNCOND)),
                                              (1.0, 1.0, (COND,)), (0.0, 1.0, (IMAGE,))])
def test_eq3_as_a_weighted_sum_needs_only_the_branches_it_weights(s_t, s_i, needed):
    rng = np.random.default_rng(0)
    e = {k: rng.standard_normal(6) for k in ALL}
    weights = branch_weights(s_t, s_i)
    assert sum(weights) == pytest.approx(1.0) and needed_branches(s_t, s_i) == needed
    exact = combine_guidance(e[COND], e[IMAGE], e[UNCOND], s_t, s_i)
    np.testing.assert_allclose(combine({k: e[k] for k in needed}, weights), exact, rtol=1e-12, atol=1e-12)


def test_image_guidance_below_one_keeps_text_guidance():
    """Unlike diffusers, s_I < 1 must not switch text guidance off: the output still depends on s_T."""
    cond, image, uncond = np.full(3, 1.0), np.full(3, 0.5), np.zeros(3)
    low = combine_guidance(cond, image, uncond, text_scale=1.0, image_scale=0.5)
    high = combine_guidance(cond, image, uncond, text_scale=7.5, image_scale=0.5)
    assert not np.allclose(low, high)
    np.testing.assert_allclose(high, 0 + 7.5 * 0.5 + 0.5 * 0.5)


def fake_unet(values, seen):
    """A UNet stand-in: branch k of image i predicts values[k] + i; records the rows it was asked for."""
    def unet(x, t, groups):
        seen.append((t, groups))
        return [{k: np.stack([np.full(x.shape[1:], values[k] + i) for i in indices]) for k in branches}
                for indices, branches in groups]
    return unet


def test_denoiser_combines_the_branches_and_v_prediction():
    seen = []
    plan = GuidancePlan(1, 2.0, 1.5)
    unet = fake_unet({COND: 3.0, IMAGE: 2.0, UNCOND: 1.0}, seen)
    x = np.full((1, 1), 4.0)
    denoised = guided_denoiser(unet, lambda s: 42.0, plan, np.concatenate)(x, 3.0)
    eps = combine_guidance(3.0, 2.0, 1.0, 2.0, 1.5)
    assert seen == [(42.0, [([0], ALL)])]
    np.testing.assert_allclose(denoised, 4.0 - 3.0 * eps)
    v = guided_denoiser(unet, lambda s: 0.0, plan, np.concatenate, prediction_type="v_prediction")(x, 3.0)
    np.testing.assert_allclose(v, 4.0 / 10 - eps * 3.0 / 10**0.5)
    with pytest.raises(ValueError):
        guided_denoiser(unet, lambda s: 0.0, plan, np.concatenate, prediction_type="sample")


def test_the_interval_guides_only_inside_it():
    plan = GuidancePlan(2, 7.5, 1.5, GuidanceOptions(interval=(1.0, 10.0)))
    assert plan.branches(14.6) == [(COND,)] * 2 and plan.branches(10.0) == [ALL] * 2
    assert plan.branches(1.0) == [(COND,)] * 2
    assert plan.weights_for((COND,)) == (1.0, 0.0, 0.0)  # eps = e_c outside the interval
    with pytest.raises(InputError, match="lo < hi"):
        GuidanceOptions(interval=(3.0, 1.0))


def test_adaptive_guidance_drops_converged_branches_per_image():
    plan = GuidancePlan(2, 7.5, 1.5, GuidanceOptions(adaptive_threshold=0.99))
    same, other = np.ones(8), np.linspace(-1, 1, 8)
    # image 0: e_i == e_u (the image term is spent); image 1: nothing has converged
    plan.observe([{COND: other, IMAGE: same, UNCOND: same}, {COND: other, IMAGE: same, UNCOND: -same}])
    assert plan.branches(5.0) == [(COND, IMAGE), ALL]
    w = plan.weights_for((COND, IMAGE))
    assert w == pytest.approx((7.5, 1.5 - 7.5 + 1 - 1.5, 0.0))  # e_u taken as e_i
    plan.observe([{COND: same, IMAGE: same}, {COND: other, IMAGE: same, UNCOND: -same}])
    assert plan.branches(5.0) == [(COND,), ALL] and plan.weights_for((COND,)) == pytest.approx((1.0, 0.0, 0.0))
    assert group_images(plan.branches(5.0)) == [([0], (COND,)), ([1], ALL)]
    assert plan.most_rows() == 1 + 3  # what a server counts against its rows per call
    plan.drop([1])
    assert plan.most_rows() == 1


def test_most_rows_bounds_every_later_step_with_a_guidance_interval():
    plan = GuidancePlan(2, [7.5, 1.0], [1.5, 1.0], GuidanceOptions(interval=(1.0, 4.0)))
    assert plan.most_rows() == 3 + 1
    assert sum(map(len, plan.branches(9.0))) == 2 and sum(map(len, plan.branches(3.0))) == 4


def test_adaptive_guidance_on_two_way_guidance_compares_the_two_branches():
    plan = GuidancePlan(1, 1.5, 1.5, GuidanceOptions(adaptive_threshold=0.99))  # s_T = s_I: rows c and u
    assert plan.branches(5.0) == [(COND, UNCOND)]
    plan.observe([{COND: np.ones(4), UNCOND: np.ones(4) * 2}])
    assert plan.branches(5.0) == [(COND,)] and plan.weights_for((COND,)) == pytest.approx((1.0, 0.0, 0.0))


def test_per_image_rows_come_back_in_image_order():
    seen = []
    plan = GuidancePlan(3, 7.5, 1.5, GuidanceOptions(adaptive_threshold=0.5))
    plan._dropped[1] |= {IMAGE, UNCOND}  # image 1 has converged, 0 and 2 have not
    unet = fake_unet({COND: 3.0, IMAGE: 2.0, UNCOND: 1.0}, seen)
    x = np.zeros((3, 2))
    out = guided_denoiser(unet, lambda s: 0.0, plan, np.concatenate)(x, 1.0)  # x - eps * sigma
    assert seen[0][1] == [([0, 2], ALL), ([1], (COND,))]
    np.testing.assert_allclose(-out[:, 0], [combine_guidance(3, 2, 1, 7.5, 1.5), 4.0, combine_guidance(5, 4, 3, 7.5, 1.5)])


def test_a_dropped_image_evaluates_nothing_and_leaves_the_others_as_they_were():
    seen = []
    unet = fake_unet({COND: 3.0, IMAGE: 2.0, UNCOND: 1.0}, seen)
    plan = GuidancePlan(3, 7.5, 1.5, GuidanceOptions(interval=(1.0, 10.0)))
    plan.drop([1])
    assert plan.branches(5.0) == [ALL, (), ALL] and plan.branches(20.0) == [(COND,), (), (COND,)]
    x = np.ones((3, 2))
    out = guided_denoiser(unet, lambda s: 0.0, plan, np.concatenate)(x, 5.0)  # x - eps * sigma
    assert seen[0][1] == [([0, 2], ALL), ([1], ())]
    np.testing.assert_allclose(out[1], x[1])  # no prediction: the sample stays where it is
    np.testing.assert_allclose(out[[0, 2], 0], 1 - 5.0 * np.array([combine_guidance(3, 2, 1, 7.5, 1.5),
                                                                    combine_guidance(5, 4, 3, 7.5, 1.5)]))
