"""The one denoising loop over a changing set of edits: every edit gets the pixels of its solo edit, whoever it
shares steps with, joining and leaving mid-way, at other step counts, samplers, presets and scales."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine import EditPipeline
from engine.presets import preset_config

# (preset, settings, seed, (s_T, s_I), the loop step it joins at)
MIXED = [
    ("exact", dict(steps=6), 1, (7.5, 1.5), 0),
    ("exact", dict(steps=3, sampler="dpmpp_2m"), 2, (5.0, 1.2), 2),
    ("fast", dict(steps=4), 3, (7.5, 1.5), 1),  # adaptive guidance: rows drop mid-way
    ("exact", dict(steps=5, sampler="unipc"), 4, (1.0, 1.0), 3),  # one branch only
    ("exact", dict(steps=2, sampler="dpmpp_2m_sde"), 5, (3.0, 3.0), 3),
    ("exact", dict(steps=4, cache_interval=2), 6, (7.5, 1.5), 4),  # step caching: its own network half the time
]


def picture(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def config_of(preset: str, settings: dict):
    return preset_config(preset, dict(resolution=None, output_type="np"), **settings)


def solo(pipe: EditPipeline, preset: str, settings: dict, seed: int, scales) -> tuple[np.ndarray, list[int]]:
    result = pipe.run([picture(seed)], f"edit {seed}", config_of(preset, settings), seed=seed,
                      guidance_scales=[scales])
    return result.images[0], result.unet_evaluations


def shared(pipe: EditPipeline, edits=MIXED, leave: dict | None = None) -> tuple[dict, list[int]]:
    """Run ``edits`` in one loop, each added at its step; ``leave`` {index: step} takes some out mid-way. Each
    result, and the rows of every UNet call."""
    calls: list[int] = []
    loop = pipe.denoising_loop(on_call=lambda rows, padded: calls.append(rows))
    results, running, tick = {}, {}, 0
    while tick <= max(e[-1] for e in edits) or loop:
        for index, (preset, settings, seed, scales, joins) in enumerate(edits):
            if joins == tick:
                running[index] = pipe.begin(picture(seed), f"edit {seed}", config_of(preset, settings), seed, scales)
                loop.add(running[index])
        for index, step in (leave or {}).items():
            if step == tick and running[index] in loop.edits:
                loop.remove(running[index])
        for edit in loop.step() if loop else []:
            index = next(i for i, e in running.items() if e is edit)
            results[index] = pipe.finish(edit)
        tick += 1
    return results, calls


@pytest.fixture(scope="module")
def bundle_pipe(onnx_bundles):
    return EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", progress=False)


def test_edits_sharing_steps_get_their_solo_pixels_on_the_onnx_bundle_bit_for_bit(bundle_pipe):
    results, calls = shared(bundle_pipe)
    assert max(calls) == 6  # rows of several edits shared calls, up to the profile's 3 x 2 rows
    for index, (preset, settings, seed, scales, _) in enumerate(MIXED):
        alone, rows = solo(bundle_pipe, preset, settings, seed, scales)
        np.testing.assert_array_equal(results[index].images[0], alone, err_msg=f"edit {index}")
        assert results[index].unet_evaluations == rows


def test_edits_sharing_steps_get_their_solo_pixels_on_torch_float32(tiny_pipe):
    """Float32 torch: to rounding (a convolution's kernel may change with the batch; documented in docs/serving.md)."""
    results, _ = shared(tiny_pipe)
    for index, (preset, settings, seed, scales, _) in enumerate(MIXED):
        alone, rows = solo(tiny_pipe, preset, settings, seed, scales)
        np.testing.assert_allclose(results[index].images[0], alone, atol=1e-5, err_msg=f"edit {index}")
        assert results[index].unet_evaluations == rows


def test_edits_sharing_steps_get_their_solo_pixels_on_torch_bfloat16_bit_for_bit(tiny_model):
    pipe = EditPipeline.from_pretrained(tiny_model, dtype="bfloat16", progress=False)
    edits = MIXED[:3]
    results, _ = shared(pipe, edits)
    for index, (preset, settings, seed, scales, _) in enumerate(edits):
        np.testing.assert_array_equal(results[index].images[0], solo(pipe, preset, settings, seed, scales)[0])


def test_an_edit_taken_out_costs_no_more_rows_and_the_others_keep_their_pixels(bundle_pipe):
    results, calls = shared(bundle_pipe, MIXED[:3], leave={0: 2})
    assert 0 not in results and set(results) == {1, 2}
    for index in (1, 2):
        preset, settings, seed, scales, _ = MIXED[index]
        np.testing.assert_array_equal(results[index].images[0], solo(bundle_pipe, preset, settings, seed, scales)[0])
    _, without = shared(bundle_pipe, MIXED[1:3])
    assert sum(calls) == sum(without) + 3 * 2  # edit 0's two steps, three rows each


def test_calls_are_split_and_padded_to_a_profiles_rows(bundle_pipe):
    """A profile that takes 2-4 rows: a 3-row step of one edit runs as is, seven rows of three edits as 4 + 3, a
    one-row edit alone padded to 2; the pixels are the solo ones."""
    calls: list[tuple[int, int]] = []
    loop = bundle_pipe.denoising_loop(on_call=lambda rows, padded: calls.append((rows, padded)))
    loop.limits = (2, 4)
    edits = [(dict(steps=2), 1, (7.5, 1.5)), (dict(steps=2), 2, (7.5, 1.5)), (dict(steps=3), 3, (1.0, 1.0))]
    started = [bundle_pipe.begin(picture(seed), f"edit {seed}", config_of("exact", s), seed, scales)
               for s, seed, scales in edits]
    for edit in started:
        loop.add(edit)
    while loop:
        loop.step()
    assert calls == [(4, 0), (3, 0), (4, 0), (3, 0), (1, 1)]
    for edit, (settings, seed, scales) in zip(started, edits):
        np.testing.assert_array_equal(bundle_pipe.finish(edit).images[0],
                                      solo(bundle_pipe, "exact", settings, seed, scales)[0])


def test_calls_past_the_unet_memory_budget_are_split_and_keep_the_pictures(tiny_model):
    """Full-size pictures: where ``unet_memory`` holds one row of the latents' size, a guided step's three rows
    run one a call, with the pictures of the three-row calls."""
    from engine.pipeline import UNET_LIVE_VALUES

    pipe = EditPipeline.from_pretrained(tiny_model, progress=False)
    assert pipe.model.unet_width == 32  # read from the UNet's config
    latent = (48 // pipe.model.vae_factor) * (40 // pipe.model.vae_factor)  # picture()'s 48x40
    calls: list[int] = []
    loop = pipe.denoising_loop(on_call=lambda rows, padded: calls.append(rows))
    loop.add(edit := pipe.begin(picture(1), "edit 1", config_of("exact", dict(steps=2)), 1, (7.5, 1.5)))
    while loop:
        loop.step()
    whole = pipe.finish(edit).images[0]
    assert calls == [3, 3]  # within the default budget
    pipe.unet_memory = latent * pipe.model.unet_width * UNET_LIVE_VALUES * pipe.backend.value_bytes
    assert pipe.unet_rows_within(latent) == 1 and pipe.unet_rows_within(latent // 3) == 3
    calls.clear()
    loop = pipe.denoising_loop(on_call=lambda rows, padded: calls.append(rows))
    loop.add(edit := pipe.begin(picture(1), "edit 1", config_of("exact", dict(steps=2)), 1, (7.5, 1.5)))
    while loop:
        loop.step()
    assert calls == [1] * 6  # 2 steps x 3 rows
    np.testing.assert_allclose(pipe.finish(edit).images[0], whole, atol=1e-5)  # float32 kernels, other batch sizes
