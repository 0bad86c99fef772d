import gc
import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine import EditPipeline, InputError, NumericalError
from tests.conftest import model_copy

INSTRUCTIONS = ["make it blue", "add snow"]


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def random_images(n, height=32, width=48, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("scales", [(7.5, 1.5), (7.5, 1.0), (1.5, 1.5), (1.0, 1.0), (3.0, 0.5)])
def test_matches_diffusers_on_non_square_batch(tiny_pipe, diffusers_pipe, scales):
    """Diffusers evaluates three branches whenever it guides; we skip those eq. 3 weights with 0 (s_I = 1: the
    ("", zero) rows; s_T = s_I: the ("", image) rows) and get its pictures to float rounding."""
    images = random_images(2)
    latents = np.random.default_rng(1).standard_normal((2, 4, 16, 24)).astype(np.float32)
    ours = tiny_pipe.edit(
        images, INSTRUCTIONS, steps=4, sampler="euler", latents=latents, resolution=None, output_type="np",
        text_guidance=scales[0], image_guidance=scales[1],
    )
    if scales == (3.0, 0.5):  # diffusers turns all guidance off when s_I < 1; we do not
        ref = diffusers_pipe(INSTRUCTIONS, image=images, num_inference_steps=4, latents=torch.from_numpy(latents),
                             output_type="np", guidance_scale=1.0, image_guidance_scale=1.0).images
        assert np.abs(ours.images - ref).max() > 1e-3
        return
    ref = diffusers_pipe(INSTRUCTIONS, image=images, num_inference_steps=4, latents=torch.from_numpy(latents),
                         output_type="np", guidance_scale=scales[0], image_guidance_scale=scales[1]).images
    assert ours.images.shape == ref.shape == (2, 32, 48, 3)
    assert np.abs(ours.images - ref).max() < 1e-3
    rows = {(7.5, 1.5): 3, (7.5, 1.0): 2, (1.5, 1.5): 2, (1.0, 1.0): 1}[scales]
    assert ours.unet_evaluations == [4 * rows] * 2 and ours.unet_work == [4.0 * rows] * 2


def test_batch_item_equals_single_edit_with_its_seed(tiny_pipe):
    images = random_images(3, seed=2)
    batch = tiny_pipe.edit(images, "add snow", steps=3, seed=10, resolution=None, output_type="np")
    assert batch.seeds == [10, 11, 12]
    single = tiny_pipe.edit(images[1], "add snow", steps=3, seed=11, resolution=None, output_type="np")
    np.testing.assert_allclose(batch.images[1], single.images[0], atol=1e-5)


def test_same_seed_same_pixels_and_different_seed_differs(tiny_pipe):
    image = random_images(1)[0]
    a = tiny_pipe.edit(image, "x", steps=2, seed=5, output_type="np").images
    b = tiny_pipe.edit(image, "x", steps=2, seed=5, output_type="np").images
    c = tiny_pipe.edit(image, "x", steps=2, seed=6, output_type="np").images
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_resolution_keep_size_and_outputs(tiny_pipe):
    image = random_images(1, height=48, width=96)[0]
    auto = tiny_pipe.edit(image, "x", steps=1, seed=0)
    assert isinstance(auto.images[0], Image.Image) and auto.images[0].size == (128, 64)  # tiny: long side ~64
    wide = tiny_pipe.edit(image, "x", steps=1, seed=0, resolution=128, output_type="np")
    assert wide.images.shape == (1, 64, 128, 3)
    kept = tiny_pipe.edit(image, "x", steps=1, seed=0, resolution=128, keep_size=True)
    assert kept.images[0].size == (96, 48)
    assert set(auto.timings) == {"preprocess", "text_encode", "image_encode", "denoise", "decode", "postprocess"}


def test_stage_timings_add_up_to_the_edit(tiny_pipe):
    """Every part of an edit is charged to a stage (the service's overhead is its latency less these)."""
    images = random_images(3, 32, 48) + random_images(1, 48, 32)  # two size groups: stages are summed over them
    gc.disable()
    try:
        start = time.perf_counter()
        result = tiny_pipe.edit(images, "x", steps=2, seed=0, resolution=None, keep_size=True)
        wall = time.perf_counter() - start
    finally:
        gc.enable()
    total = sum(result.timings.values())
    assert 0 < total <= wall and wall - total < 1e-3


def test_mixed_sizes_are_grouped_and_kept_in_order(tiny_pipe):
    a, b = random_images(1, 32, 48)[0], random_images(1, 48, 32)[0]
    out = tiny_pipe.edit([a, b, a], "x", steps=1, seed=0, resolution=None, output_type="np")
    assert [im.shape for im in out.images] == [(32, 48, 3), (48, 32, 3), (32, 48, 3)]
    alone = tiny_pipe.edit(b, "x", steps=1, seed=1, resolution=None, output_type="np")
    np.testing.assert_allclose(out.images[1], alone.images[0], atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "euler", "dpmpp_2m", "ddim"])
def test_every_sampler_edits(tiny_pipe, sampler):
    out = tiny_pipe.edit(random_images(1)[0], "", steps=3, seed=0, sampler=sampler, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_bad_arguments_are_refused(tiny_pipe, tmp_path, monkeypatch):
    image = random_images(1)[0]
    with pytest.raises(InputError, match="one per image"):
        tiny_pipe.edit([image, image], ["a", "b", "c"])
    with pytest.raises(InputError, match="sampler"):
        tiny_pipe.edit(image, "x", sampler="plms")
    with pytest.raises(InputError, match="steps"):
        tiny_pipe.edit(image, "x", steps=0)
    with pytest.raises(InputError, match="latents must have shape"):
        tiny_pipe.edit(image, "x", latents=np.zeros((1, 4, 8, 8)), resolution=None)
    monkeypatch.delenv("IP2P_MODEL", raising=False)
    monkeypatch.setattr("engine.pipeline.DEFAULT_MODEL", tmp_path / "missing")
    with pytest.raises(InputError, match="no model given and the shipped model is missing"):
        EditPipeline.from_pretrained(None)


def broken_copy(tiny_model, tmp_path, scale):
    """A copy of the tiny model whose VAE decoder's first conv is multiplied by ``scale``."""
    from safetensors.torch import load_file, save_file

    copy = model_copy(tiny_model, tmp_path / "model")
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"] * scale
    save_file(state, weights)
    return str(copy)


def test_fp16_overflow_falls_back_to_fp32_decoder(tiny_model, tmp_path, caplog):
    model = broken_copy(tiny_model, tmp_path, 1e4)  # activations over fp16's 65504; GroupNorm rescales in fp32
    image = random_images(1)[0]
    fp32 = EditPipeline.from_pretrained(model, progress=False).edit(image, "x", steps=2, seed=0, output_type="np")
    fp16 = EditPipeline.from_pretrained(model, dtype="float16", progress=False, backend_options={"keep_dtype": True})
    out = fp16.edit(image, "x", steps=2, seed=0, output_type="np")
    assert "decoding again in float32" in caplog.text
    assert np.isfinite(out.images).all() and np.abs(out.images - fp32.images).mean() < 0.05


def test_nan_weights_raise_instead_of_black_image(tiny_model, tmp_path):
    model = broken_copy(tiny_model, tmp_path, float("nan"))
    with pytest.raises(NumericalError, match="NaN"):
        EditPipeline.from_pretrained(model, progress=False).edit(random_images(1)[0], "x", steps=1, seed=0)


def test_empty_instruction_is_allowed(tiny_pipe):
    assert tiny_pipe.edit(random_images(1)[0], "", steps=1, seed=0).images[0].size == (64, 64)


def test_default_resolution_comes_from_the_model_config(tiny_model, tmp_path):
    copy = model_copy(tiny_model, tmp_path / "m", {"sample_size": 16})
    pipe = EditPipeline.from_pretrained(str(copy), progress=False)
    assert pipe.model.default_resolution == 32
    assert pipe.edit(random_images(1)[0], "x", steps=1, seed=0).images[0].size == (64, 64)  # multiple of 64


def test_adaptive_guidance_decides_per_image_without_touching_the_others(tiny_pipe):
    """An image whose branches converge stops evaluating them; its batch neighbour gets the pixels it gets
    alone (to float rounding: the UNet's batch shrinks around it)."""
    images = random_images(2, seed=3)
    kwargs = dict(steps=8, sampler="euler", seed=[5, 6], resolution=None, output_type="np")
    exact = tiny_pipe.edit(images, INSTRUCTIONS, **kwargs)
    assert exact.unet_evaluations == [24, 24]
    loose = tiny_pipe.edit(images, INSTRUCTIONS, adaptive_guidance=0.2, **kwargs)  # random weights: low threshold
    assert max(loose.unet_evaluations) < 24
    for i in range(2):
        alone = tiny_pipe.edit(images[i], INSTRUCTIONS[i], adaptive_guidance=0.2, **{**kwargs, "seed": 5 + i})
        assert alone.unet_evaluations == [loose.unet_evaluations[i]]
        np.testing.assert_allclose(loose.images[i], alone.images[0], atol=1e-5)


def test_guidance_interval_counts_its_rows(tiny_pipe):
    image = random_images(1)[0]
    from engine.samplers import SAMPLERS

    sigmas = SAMPLERS["euler"].schedule(tiny_pipe.model.scheduler, 6).sigmas
    lo, hi = float(sigmas[4]), float(sigmas[1])  # guide at steps 2, 3 and 4 of 6
    result = tiny_pipe.edit(image, "x", steps=6, sampler="euler", seed=0, guidance_interval=(lo, hi))
    assert result.unet_evaluations == [3 * 3 + 3 * 1]


def test_per_image_guidance_scales_give_each_image_its_solo_pixels(tiny_pipe):
    """A server batches requests with different scales: each image must get the pixels of its own edit, and
    the rows eq. 3 weights for its scales only (s_I = 1: two branches)."""
    from engine.presets import preset_config

    images, scales = random_images(3), [(7.5, 1.5), (3.0, 1.0), (1.5, 1.5)]
    config = preset_config("exact", dict(resolution=None, output_type="np"), steps=3)
    batch = tiny_pipe.run(images, INSTRUCTIONS[0], config, seed=[4, 5, 6], guidance_scales=scales)
    for i, (text, image) in enumerate(scales):
        solo = tiny_pipe.edit(images[i], INSTRUCTIONS[0], steps=3, seed=4 + i, resolution=None, output_type="np",
                              text_guidance=text, image_guidance=image)
        np.testing.assert_allclose(batch.images[i], solo.images[0], atol=1e-5)
        assert batch.unet_evaluations[i] == solo.unet_evaluations[0]
    assert batch.unet_evaluations == [9, 6, 6]
    with pytest.raises(InputError, match="one \\(text, image\\) guidance pair per image"):
        tiny_pipe.run(images, "x", config, guidance_scales=scales[:2])
    with pytest.raises(InputError, match="two numbers"):
        tiny_pipe.run(images[:1], "x", config, guidance_scales=[(7.5, "a")])


def test_a_step_callback_sees_progress_and_can_cancel(tiny_pipe):
    from engine.errors import Cancelled
    from engine.presets import preset_config

    config = preset_config("exact", dict(resolution=None), steps=4)
    seen = []
    tiny_pipe.run(random_images(1), "x", config, seed=0, on_step=seen.append)
    assert seen == [1, 2, 3, 4]

    def stop_after_two(done):
        seen.append(done)
        if done == 2:
            raise Cancelled("stop")

    seen.clear()
    with pytest.raises(Cancelled):
        tiny_pipe.run(random_images(2), "x", config, seed=0, on_step=stop_after_two)
    assert seen == [1, 2]  # no further step ran


def test_a_step_callback_can_drop_images_and_the_others_keep_their_pixels(tiny_pipe):
    from engine.presets import preset_config

    config = preset_config("exact", dict(resolution=None, output_type="np"), steps=4)
    images = random_images(3)
    dropped = tiny_pipe.run(images, "x", config, seed=[5, 6, 7], on_step=lambda done: [1] if done >= 2 else None)
    assert dropped.unet_evaluations == [12, 6, 12]  # image 1: two steps of three rows, then none
    assert np.all(dropped.images[1] == 0.5)  # not decoded: mid-grey
    for i in (0, 2):
        alone = tiny_pipe.run([images[i]], "x", config, seed=5 + i)
        np.testing.assert_allclose(dropped.images[i], alone.images[0], atol=1e-5)
    everyone = tiny_pipe.run(images[:2], "x", config, seed=0, on_step=lambda done: [0, 1])
    assert everyone.unet_evaluations == [3, 3] and np.all(everyone.images == 0.5)


def test_edit_size_is_the_size_run_denoises_at(tiny_pipe):
    image = random_images(1, height=50, width=90)[0]
    result = tiny_pipe.edit(image, "x", steps=1, resolution=64)
    assert result.images[0].size == tiny_pipe.edit_size(image.size, 64)
    assert tiny_pipe.edit_size((48, 32), None) == (48, 32)
