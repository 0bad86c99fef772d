import pytest

from engine import specs
from engine.errors import InputError


def test_profile_dims_and_shapes():
    profile = specs.Profile(batch=(1, 1, 4), height=(256, 512, 768), width=(256, 512, 768))
    dims = profile.dims(vae_factor=8, text_dim=768)
    assert dims["N"] == (1, 3, 12) and dims["H"] == (32, 64, 96) and dims["D"] == (768,) * 3
    ranges = specs.shape_ranges(specs.UNET, dims)
    assert ranges["sample"] == ((1, 8, 32, 32), (3, 8, 64, 64), (12, 8, 96, 96))
    assert ranges["encoder_hidden_states"][2] == (12, 77, 768)
    assert specs.shape_ranges(specs.VAE_ENCODER, dims)["images"][0] == (1, 3, 256, 256)


def test_a_static_profile_fixes_every_axis_but_the_unet_rows():
    profile = specs.Profile(batch=(2, 2, 2), height=(512,) * 3, width=(384,) * 3)
    assert profile.static
    dims = profile.dims(8, 768)
    assert dims["N"] == (2, 6, 6)  # B (no guidance) to 3B: one CUDA graph or TensorRT profile per row count
    assert all(lo == hi for name, (lo, _, hi) in dims.items() if name != "N")


@pytest.mark.parametrize("text, expected", [("4", (4, 4, 4)), ("1:4", (1, 1, 4)), ("1:2:4", (1, 2, 4))])
def test_parse_range(text, expected):
    assert specs.parse_range(text, "--batch", default_opt=1) == expected


def test_parse_range_opt_is_clamped():
    assert specs.parse_range("256:384", "--resolution", default_opt=512) == (256, 384, 384)


@pytest.mark.parametrize("text", ["4:1", "1:5:4", "a:b", "1:2:3:4"])
def test_bad_ranges_are_refused(text):
    with pytest.raises(InputError):
        specs.parse_range(text, "--batch")


def test_profile_check():
    with pytest.raises(InputError, match="multiples of 64"):
        specs.Profile((1, 1, 1), (200, 256, 256), (256, 256, 256)).check(64)
    with pytest.raises(InputError, match="min <= opt <= max"):
        specs.Profile((2, 1, 4), (256, 256, 256), (256, 256, 256)).check(64)
    profile = specs.Profile((1, 1, 4), (256, 512, 768), (256, 512, 768))
    assert specs.Profile.from_dict(profile.to_dict()) == profile.check(64)
