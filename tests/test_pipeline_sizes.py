"""Edits at the pictures' own sizes: any size by mirrored padding, the VAE in tiles, and keep_detail."""
import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from engine import EditPipeline, InputError
from engine.config import EditConfig
from engine import images as imaging
from engine.specs import VAE_ENCODER, VAE_ENCODER_TILE
from tests.test_pipeline import random_images


def test_any_size_edits_at_full_size_as_its_mirrored_padding_would(tiny_pipe):
    """resolution=None pads a side that is no multiple of the model's by mirroring and crops the result back."""
    image = random_images(1, 30, 45)[0]
    multiple = tiny_pipe.model.downsampling
    assert 30 % multiple and 45 % multiple  # both sides need padding
    out = tiny_pipe.edit(image, "x", steps=2, seed=4, resolution=None, output_type="np")
    assert out.images.shape == (1, 30, 45, 3)
    padded = imaging.pad_to_multiple(image, multiple)
    assert padded.size[0] % multiple == 0 and padded.size[1] % multiple == 0
    np.testing.assert_array_equal(np.asarray(padded)[:30, :45], np.asarray(image))
    whole = tiny_pipe.edit(padded, "x", steps=2, seed=4, resolution=None, output_type="np")
    np.testing.assert_array_equal(out.images[0], whole.images[0][:30, :45])


def test_padding_mirrors_the_picture_even_a_one_pixel_side():
    image = Image.fromarray(np.arange(3 * 1 * 3, dtype=np.uint8).reshape(3, 1, 3))
    padded = np.asarray(imaging.pad_to_multiple(image, 4))
    assert padded.shape == (4, 4, 3)
    np.testing.assert_array_equal(padded[3], padded[2])  # the last row mirrored
    np.testing.assert_array_equal(padded[:3, 3], padded[:3, 0])


def test_a_picture_that_fits_one_tile_is_not_tiled_and_auto_tiles_past_the_budget(tiny_model):
    pipe = EditPipeline.from_pretrained(tiny_model, progress=False)
    assert pipe.vae_tiling("auto", (64, 64), 1) is None
    assert pipe.vae_tiling(64, (64, 64), 1) is None and pipe.vae_tiling(None, (4096, 4096), 1) is None
    pipe.vae_memory = 64 * 64 * pipe.model.vae_width * 16  # a 64x64 picture's activations, no more
    assert pipe.vae_tiling("auto", (64, 64), 1) is None
    tiles = pipe.vae_tiling("auto", (128, 64), 1)
    assert tiles is not None and tiles.tile * pipe.model.vae_factor == 64


def test_auto_counts_the_whole_vae_in_the_dtype_it_computes_in(tiny_model):
    """bfloat16 activations take half the bytes: a picture twice as large runs whole in the same budget; tiles
    keep their float32 size (the tile networks normalise in float32)."""
    pipe = EditPipeline.from_pretrained(tiny_model, dtype="bfloat16", progress=False)
    assert pipe.backend.value_bytes == 2
    pipe.vae_memory = 64 * 64 * pipe.model.vae_width * 16
    assert pipe.vae_tiling("auto", (128, 64), 1) is None
    tiles = pipe.vae_tiling("auto", (128, 128), 1)
    assert tiles is not None and tiles.tile * pipe.model.vae_factor == 64


def test_tiles_are_counted_and_a_tile_larger_than_the_picture_changes_nothing(tiny_pipe):
    image = random_images(1, 48, 96)[0]
    kwargs = dict(steps=2, seed=1, resolution=None, output_type="np")
    whole = tiny_pipe.edit(image, "x", vae_tile=None, **kwargs)
    assert whole.tiles == {}
    np.testing.assert_array_equal(tiny_pipe.edit(image, "x", vae_tile=128, **kwargs).images, whole.images)
    tiled = tiny_pipe.edit(image, "x", vae_tile=32, **kwargs)
    factor = tiny_pipe.model.vae_factor
    count = tiny_pipe.vae_tiling(32, (96, 48), 1).count(48 // factor, 96 // factor)
    assert tiled.tiles == {"image_encode": 2 * count, "decode": 2 * count} and count > 2  # statistics, then pictures
    assert tiled.images.shape == whole.images.shape and np.isfinite(tiled.images).all()
    assert tiled.timings["decode"] > 0


def test_tiles_are_reported_as_they_run(tiny_pipe):
    heard = []
    config = dataclasses.replace(EditConfig(steps=1), resolution=None, vae_tile=32)
    result = tiny_pipe.run(random_images(1, 48, 96), "x", config, seed=0,
                           on_tiles=lambda stage, done, total: heard.append((stage, done, total)))
    assert [h[0] for h in heard] == sorted(h[0] for h in heard)[::-1]  # the encoder's tiles, then the decoder's
    for stage, count in result.tiles.items():
        mine = [h for h in heard if h[0] == stage]
        done = [h[1] for h in mine]  # after each call, which may run several tiles
        assert done == sorted(done) and done[-1] == count and {h[2] for h in mine} == {count} and len(done) >= 2


def test_a_jobs_view_shows_its_tiles_while_it_runs():
    from engine.serving.app import view_of
    from engine.serving.jobs import Job, advance_tiles, job_config
    from engine.serving.schema import EditParameters

    params = EditParameters(instruction="x")
    job = Job(Image.new("RGB", (8, 8)), params, job_config(params), None, None)
    advance_tiles([job], "decode", 3, 8)
    assert job.tiles is None  # a queued job is not running yet
    job.start()
    advance_tiles([job], "decode", 3, 8)

    class Service:
        def position(self, job):
            return None

    view = asyncio.run(view_of(job, Service()))
    assert view.tiles == ("decode", 3, 8) and view.state == "running"


def test_tiles_with_the_whole_pictures_statistics_agree_with_the_whole():
    """The shapes model's VAE is trained: with the whole picture's GroupNorm statistics, tiles of twice its
    resolution give the whole picture's pixels to 35 dB, where tiles normalised over themselves do not (the
    figures per size and tile are in docs/highres.md)."""
    from benchmarks.highres import photo
    from training.evaluation import psnr

    pipe = EditPipeline.from_pretrained(progress=False)
    pixels = imaging.to_model_input([photo(256, 192, seed=1), photo(256, 192, seed=2)])
    scale = pipe.model.scaling_factor
    whole = pipe.decode(pipe.encode_image(pixels) * scale)
    tiles = pipe.vae_tiling(128, (256, 192), 2)
    tiled = pipe.decode(pipe.encode_image(pixels, tiles) * scale, tiles)
    assert psnr(tiled, whole, 2.0) >= 35.0
    own = [pipe.backend.run(VAE_ENCODER.name, {"images": pipe.backend.asarray(tile)})["image_latents"]
           for tile in (pixels[:, :, :, :128], pixels[:, :, :, 128:])]
    naive = pipe.decode(pipe.backend.concat(own, 3) * scale)  # two tiles side by side, each normalised alone
    assert psnr(naive, whole, 2.0) < psnr(tiled, whole, 2.0) - 5


def test_the_tile_network_with_its_own_statistics_is_the_plain_network(tiny_pipe):
    """given_stats 0 and a tile owning all its cells: the tile networks compute what the plain ones do, and
    report the statistics their GroupNorms saw; as many layers as the model's config says."""
    be, model = tiny_pipe.backend, tiny_pipe.model
    pixels = imaging.to_model_input(random_images(2, 32, 48))
    layers, _, groups = model.vae_norms
    out = be.run(VAE_ENCODER_TILE.name, {
        "images": be.asarray(pixels), "norm_stats": be.asarray(np.zeros((layers, 2, groups, 2), np.float32)),
        "owned": be.asarray(np.ones((2, 1, 32 // model.vae_factor, 48 // model.vae_factor), np.float32)),
        "given_stats": be.asarray(np.zeros(1, np.float32))})
    plain = be.run(VAE_ENCODER.name, {"images": be.asarray(pixels)})["image_latents"]
    np.testing.assert_allclose(be.to_numpy(out["image_latents"]), be.to_numpy(plain), atol=1e-5)
    parts = be.to_numpy(out["norm_parts"])
    assert parts.shape == (layers, 2, groups, 3) and (parts[..., 0] > 0).all()
    half = np.ones((2, 1, 32 // model.vae_factor, 48 // model.vae_factor), np.float32)
    half[..., half.shape[-1] // 2 :] = 0  # the tile owns its left half only: every layer counts half the cells
    counted = be.to_numpy(be.run(VAE_ENCODER_TILE.name, {
        "images": be.asarray(pixels), "norm_stats": be.asarray(np.zeros((layers, 2, groups, 2), np.float32)),
        "owned": be.asarray(half), "given_stats": be.asarray(np.zeros(1, np.float32))})["norm_parts"])
    np.testing.assert_allclose(counted[..., 0], parts[..., 0] / 2)


def test_keep_detail_adds_only_the_change_to_the_full_size_input(tiny_pipe):
    image = random_images(1, 96, 128, seed=3)[0]
    kwargs = dict(steps=2, seed=2, output_type="np")
    result = tiny_pipe.edit(image, "x", keep_detail=True, **kwargs)
    assert result.images.shape == (1, 96, 128, 3)
    working = imaging.prepare(image, tiny_pipe.model.default_resolution, 64, crop=False)  # stretched, not cropped
    plain = tiny_pipe.edit(working, "x", **kwargs).images[0]  # (h, w, 3) at the working size
    pixels = imaging.to_model_input([working])
    own = tiny_pipe.decode(tiny_pipe.encode_image(pixels) * tiny_pipe.model.scaling_factor)[0]
    expected = imaging.from_model_output(imaging.carry_change(image, plain.transpose(2, 0, 1) * 2 - 1, own)[None])[0]
    close = np.abs(result.images[0] - expected) < 2e-3
    assert close.mean() > 0.9  # the plain edit's output is clipped to [0, 1] and the change near a clipped pixel with it


def test_carry_change_keeps_the_input_where_the_edit_changed_nothing():
    rng = np.random.default_rng(0)
    original = Image.fromarray((rng.random((80, 120, 3)) * 255).astype(np.uint8))
    same = rng.normal(size=(3, 20, 30)).astype(np.float32)
    carried = imaging.carry_change(original, same, same)
    np.testing.assert_array_equal(imaging.to_pil(imaging.from_model_output(carried[None])[0]), original)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vae_tile=66), "vae_tile: 66 px is not a multiple of"),
    (dict(vae_tile="big"), "vae_tile must be a tile side in pixels"),
    (dict(keep_detail=True, resolution=None), "keep_detail carries an edit made at a working resolution"),
])
def test_bad_tiles_and_keep_detail_without_a_resolution_are_one_line(tiny_pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny_pipe.edit(random_images(1, 64, 64)[0], "x", steps=1, **kwargs)


def test_a_bundle_tiles_within_its_profile(onnx_bundles):
    pipe = EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", progress=False)
    profile = pipe.profile
    pipe.vae_memory = 1
    tiles = pipe.vae_tiling("auto", (profile.width[2] * 2, profile.height[2]), 1)
    assert tiles.tile * pipe.model.vae_factor <= min(profile.height[2], profile.width[2])
    with pytest.raises(InputError, match="vae_tile: .* outside this bundle's profile"):
        pipe.vae_tiling(profile.width[2] * 2, (profile.width[2] * 4, profile.height[2] * 4), 1)
    factor = pipe.model.vae_factor
    assert tiles.overlap > 0 and tiles.count(profile.height[2] // factor, profile.width[2] * 2 // factor) >= 2


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_bundle_runs_the_tiles_as_torch_does(onnx_bundles, tiny_pipe, backend):
    """Bundles carry the tile networks (float32): the same tiles and statistics as the torch backend."""
    pytest.importorskip(backend)
    pipe = EditPipeline.from_pretrained(onnx_bundles["fp32"], backend=backend, dtype="float32", progress=False)
    assert pipe.backend.has(VAE_ENCODER_TILE.name)
    pixels = imaging.to_model_input(random_images(1, 96, 128, seed=5))
    tiles = pipe.vae_tiling(64, (128, 96), 1)
    scale = pipe.model.scaling_factor
    ours = pipe.decode(pipe.encode_image(pixels, tiles) * scale, tiles)
    reference = tiny_pipe.decode(tiny_pipe.encode_image(pixels, tiles) * scale, tiles)
    np.testing.assert_allclose(ours, reference, atol=2e-3)


@pytest.mark.parametrize("given", [0.0, 1.0])
def test_the_tile_networks_eager_path_equals_the_masked_graph(tiny_pipe, given, monkeypatch):
    """Eager torch slices each row's owned rectangle and normalises in fused kernels; an export traces the masked
    graph. Both give the same pictures and statistics, for two rows owning different rectangles, with given
    statistics and with the tile's own; a mask that is no rectangle takes the graph's path."""
    from engine.backends import torch_modules

    module = torch_modules.tile_module({VAE_ENCODER.name: tiny_pipe.backend._module(VAE_ENCODER.name)[0]},
                                       VAE_ENCODER_TILE.name)
    layers, _, groups = tiny_pipe.model.vae_norms
    rng = np.random.default_rng(4)
    pixels = torch.from_numpy(imaging.to_model_input(random_images(2, 32, 48)))
    owned = torch.zeros(2, 1, 32 // tiny_pipe.model.vae_factor, 48 // tiny_pipe.model.vae_factor)
    owned[0, :, 1:3, 0:4], owned[1, :, :, 2:] = 1, 1
    stats = torch.from_numpy(np.stack([rng.normal(0, 0.3, (layers, 2, groups)),
                                       rng.uniform(0.5, 2, (layers, 2, groups))], -1).astype(np.float32))
    args = (pixels, stats, owned, torch.tensor([given]))
    with torch.inference_mode():
        eager = module(*args)
        monkeypatch.setattr(torch_modules, "owned_boxes", lambda owned: None)  # the graph's masked path
        graph = module(*args)
        monkeypatch.undo()
    for a, b in zip(eager, graph):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    assert torch_modules.owned_boxes(owned) == [(1, 3, 0, 4), (0, owned.shape[2], 2, owned.shape[3])]
    owned[0, :, 0, 0] = 1  # an L shape
    assert torch_modules.owned_boxes(owned) is None
