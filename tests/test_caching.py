"""Step caching in the denoising loop: which calls run the whole UNet, and what each image's edit costs."""
import numpy as np
import pytest

from engine.caching import FeatureCache, StepCache
from engine.errors import InputError
from engine.schedules import euler_schedule
from tests.test_pipeline import random_images


def shallow_share(pipe, image) -> float:
    """MACs of a shallow row over a whole one (at the model's own size)."""
    return pipe.backend.macs("unet_shallow_d1") / pipe.backend.macs("unet_full_d1")


def test_every_interval_th_call_is_full():
    cache = StepCache(interval=3, depth=2)
    assert [cache.full(i) for i in range(7)] == [True, False, False, True, False, False, True]
    assert cache.components == ("unet_full_d2", "unet_shallow_d2") and cache.on
    assert StepCache().components == ("unet", "unet") and not StepCache().on
    for bad in (0, 1.5, True):
        with pytest.raises(InputError, match="whole number"):
            StepCache(interval=bad)


def test_the_feature_cache_hands_out_the_rows_asked_for():
    cache = FeatureCache(lambda parts: np.concatenate(parts, 0))
    feature = np.arange(4, dtype=np.float32).reshape(4, 1)
    rows = [(0, 0), (1, 0), (0, 1), (1, 1)]
    cache.store(rows, feature)
    assert cache.take(rows) is feature
    assert cache.take([(1, 1), (0, 0)]).ravel().tolist() == [3.0, 0.0]
    assert cache.covers([(0, 1)]) and not cache.covers([(0, 2)])


def test_interval_one_is_the_exact_edit_and_others_cost_less(tiny_pipe):
    image = random_images(1)[0]
    kwargs = dict(steps=6, seed=3, output_type="np", resolution=None)
    exact = tiny_pipe.edit(image, "x", **kwargs)
    assert np.array_equal(tiny_pipe.edit(image, "x", cache_interval=1, **kwargs).images, exact.images)
    cached = tiny_pipe.edit(image, "x", cache_interval=3, **kwargs)
    ratio = shallow_share(tiny_pipe, image)
    assert cached.unet_evaluations == exact.unet_evaluations == [18]
    assert cached.unet_work[0] == pytest.approx(3 * (2 + 4 * ratio))  # calls 0 and 3 whole, four shallow
    assert exact.unet_work == [18.0]
    difference = np.abs(cached.images - exact.images)
    assert 0 < difference.mean() < 0.1


def test_a_guidance_interval_starting_forces_a_whole_call(tiny_pipe):
    """Rows the last full call did not have (guidance branches starting) cannot come from the cache."""
    sigmas = euler_schedule(tiny_pipe.model.scheduler, 6).sigmas
    interval = (float(sigmas[4]), float(sigmas[1]))  # guided at calls 1, 2 and 3 of 0..5
    image = random_images(1)[0]
    result = tiny_pipe.edit(image, "x", steps=6, sampler="euler", seed=0, guidance_interval=interval, cache_interval=10,
                           resolution=None)
    ratio = shallow_share(tiny_pipe, image)
    assert result.unet_evaluations == [3 * 3 + 3 * 1]
    # call 0 whole (1 row), call 1 whole (3 rows: new branches), calls 2-5 shallow (3, 3, 1, 1 rows)
    assert result.unet_work[0] == pytest.approx(1 + 3 + (3 + 3 + 1 + 1) * ratio)


def test_each_image_in_a_batch_gets_its_solo_pixels_with_caching_and_adaptive_guidance(tiny_pipe):
    """Per-image branch decisions and cached rows must not leak between the images of a batch."""
    images = random_images(2, seed=5)
    kwargs = dict(steps=6, output_type="np", cache_interval=2, adaptive_guidance=0.5)
    batch = tiny_pipe.edit(images, ["make it red", "remove it"], seed=[11, 12], **kwargs)
    for i, (image, text, seed) in enumerate(zip(images, ["make it red", "remove it"], [11, 12])):
        solo = tiny_pipe.edit(image, text, seed=seed, **kwargs)
        np.testing.assert_allclose(batch.images[i], solo.images[0], atol=1e-5)
        assert batch.unet_work[i] == pytest.approx(solo.unet_work[0])


def test_bundles_cache_steps_as_torch_does(onnx_bundles, tiny_model):
    from engine.pipeline import EditPipeline

    image = random_images(1, height=64, width=64)[0]
    kwargs = dict(steps=4, seed=1, output_type="np", resolution=None, cache_interval=2)
    bundle = EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", progress=False)
    torch_pipe = EditPipeline.from_pretrained(tiny_model, progress=False)
    got, want = bundle.edit(image, "x", **kwargs), torch_pipe.edit(image, "x", **kwargs)
    np.testing.assert_allclose(got.images, want.images, atol=1e-4)
    assert got.unet_work[0] == pytest.approx(want.unet_work[0], rel=0.05)  # the bundle's MACs are counted at 64 px
    assert got.unet_work[0] < got.unet_evaluations[0]


def test_a_bundle_without_the_split_unet_is_refused_up_front(onnx_bundles):
    from engine.pipeline import EditPipeline

    bundle = EditPipeline.from_pretrained(onnx_bundles["fp16"], progress=False)
    with pytest.raises(InputError, match=r"lacks: export it with `ip2p export MODEL OUT --step-cache 1`"):
        bundle.edit(random_images(1)[0], "x", steps=2, cache_interval=2)
