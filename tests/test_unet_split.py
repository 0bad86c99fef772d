"""The UNet split for step caching: the full half is the UNet itself, the shallow half on a fresh feature too."""
import numpy as np
import pytest
import torch

from engine.backends import torch_backend, torch_modules
from engine.backends.unet_split import FullUNet, ShallowUNet, feature_shape
from engine.checkpoints import resolve_model
from engine.errors import InputError
from engine.pipeline import DEFAULT_MODEL


@pytest.fixture(scope="module")
def shapes_unet():
    """The shipped shapes model's UNet: three levels, so depths 1 and 2 both exist."""
    unet, _, _ = torch_modules.load_networks(resolve_model(DEFAULT_MODEL))
    return unet.eval()


def unet_inputs(unet, rows=3, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(rows, 8, side, side, generator=g), "timestep": torch.tensor([999.0, 500.0, 3.0][:rows]),
            "encoder_hidden_states": torch.randn(rows, 77, unet.config.cross_attention_dim, generator=g)}


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("side", [16, 12])  # 12: not a multiple of the UNet's 4x, so the up levels follow the skips
def test_full_half_is_the_unet_and_the_shallow_half_on_its_feature_too(shapes_unet, depth, side):
    inputs = unet_inputs(shapes_unet, side=side)
    with torch.no_grad():
        reference = shapes_unet(**inputs, return_dict=False)[0]
        noise, feature = FullUNet(shapes_unet, depth)(**inputs)
        shallow = ShallowUNet(shapes_unet, depth)(**inputs, deep_feature=feature)
    assert torch.equal(noise, reference)
    assert tuple(feature.shape[1:]) == feature_shape(shapes_unet, depth, (side, side))
    torch.testing.assert_close(shallow, reference, rtol=0, atol=1e-6)


def test_a_stale_feature_changes_the_shallow_output(shapes_unet):
    """The shallow half really reads the feature: a feature from another step gives another prediction."""
    inputs = unet_inputs(shapes_unet)
    with torch.no_grad():
        _, stale = FullUNet(shapes_unet, 1)(**{**inputs, "timestep": inputs["timestep"] * 0 + 200.0})
        fresh = FullUNet(shapes_unet, 1)(**inputs)[0]
        reused = ShallowUNet(shapes_unet, 1)(**inputs, deep_feature=stale)
    assert (reused - fresh).abs().max() > 1e-3


def test_token_downsampling_is_kept_by_both_halves(tiny_model):
    backend = torch_backend.load(resolve_model(tiny_model), kv_downsample=2)
    u = backend._unet
    inputs = {k: v for k, v in unet_inputs(u, side=8).items()}
    plain = backend.run("unet", inputs)["noise_pred"]
    full = backend.run("unet_full_d1", inputs)
    shallow = backend.run("unet_shallow_d1", {**inputs, "deep_feature": full["deep_feature"]})["noise_pred"]
    assert torch.equal(full["noise_pred"], plain)
    torch.testing.assert_close(shallow, plain, rtol=0, atol=1e-6)


def test_depths_without_a_level_are_refused(shapes_unet, tiny_pipe):
    with pytest.raises(InputError, match="from 1 to 2 for this UNet"):
        FullUNet(shapes_unet, 3)
    with pytest.raises(InputError, match="from 1 to 1"):
        tiny_pipe.edit(np.zeros((32, 32, 3), np.uint8), "x", steps=2, cache_interval=2, cache_depth=2)


def test_work_is_counted_in_multiply_accumulates(shapes_unet, tiny_pipe):
    """The shallow half costs a part of the UNet; the full half exactly the UNet (its feature is free)."""
    backend = tiny_pipe.backend
    full, shallow, plain = (backend.macs(name) for name in ("unet_full_d1", "unet_shallow_d1", "unet"))
    assert full == plain and 0 < shallow < 0.6 * full
    deep = torch_modules.unet_macs(shapes_unet, "unet_shallow_d2", (16, 16), 64)
    assert torch_modules.unet_macs(shapes_unet, "unet_shallow_d1", (16, 16), 64) < deep
    assert deep < torch_modules.unet_macs(shapes_unet, "unet", (16, 16), 64)
