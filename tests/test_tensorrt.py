"""TensorRT: pure logic everywhere; engine building where TensorRT and a GPU exist."""
import dataclasses
import importlib.util

import pytest

from engine import specs
from engine.backends.tensorrt_backend import check_engine_compatible
from engine.errors import InputError
from engine.manifest import read_bundle
from engine.pipeline import DEFAULT_BUNDLE
from export.tensorrt_build import engine_cache_key, engine_profiles, input_shapes, profile_shapes, timing_cache_name

GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
SHAPES = [{"sample": ((1, 8, 32, 32), (3, 8, 64, 64), (12, 8, 96, 96))}]


def test_engine_cache_key_changes_with_everything_that_matters():
    base = engine_cache_key("abc", "fp16", SHAPES, "10.13.0", GPU)
    assert base == engine_cache_key("abc", "fp16", [dict(SHAPES[0])], "10.13.0", dict(GPU))
    variants = [
        engine_cache_key("abd", "fp16", SHAPES, "10.13.0", GPU),
        engine_cache_key("abc", "fp32", SHAPES, "10.13.0", GPU),
        engine_cache_key("abc", "fp16", [{"sample": ((1, 8, 32, 32), (3, 8, 64, 64), (6, 8, 96, 96))}], "10.13.0", GPU),
        engine_cache_key("abc", "fp16", SHAPES, "10.14.0", GPU),
        engine_cache_key("abc", "fp16", SHAPES, "10.13.0", {**GPU, "name": "NVIDIA L4"}),
        engine_cache_key("abc", "fp16", SHAPES, "10.13.0", {**GPU, "compute_capability": "8.9"}),
    ]
    assert len({base, *variants}) == 7


def test_timing_cache_name_is_per_version_and_gpu():
    assert timing_cache_name("10.13.0", GPU) == "timing-10.13.0-NVIDIA-H100-80GB-HBM3-sm90.cache"


def test_engine_profiles_come_from_the_specs():
    dynamic = specs.Profile((1, 1, 4), (256, 512, 768), (256, 512, 768))
    shapes = input_shapes(specs.UNET, dynamic.dims(8, 768))
    assert shapes["sample"] == ((1, 8, 32, 32), (3, 8, 64, 64), (12, 8, 96, 96))
    assert set(shapes) == {"sample", "timestep", "encoder_hidden_states"}
    assert profile_shapes(specs.UNET, engine_profiles(dynamic.dims(8, 768), static=False)) == [shapes]


def test_static_engines_get_one_profile_per_unet_row_count():
    """A static bundle's UNet engines take every row count guidance can ask for, B to 3B, each a static
    profile; networks without UNet rows keep one."""
    static = specs.Profile((2, 2, 2), (512,) * 3, (512,) * 3)
    profiles = engine_profiles(static.dims(8, 768), static=True)
    unet = profile_shapes(specs.UNET, profiles)
    assert [p["timestep"] for p in unet] == [((n,), (n,), (n,)) for n in range(2, 7)]
    assert unet[0]["sample"] == ((2, 8, 64, 64),) * 3
    assert len(profile_shapes(specs.VAE_DECODER, profiles)) == 1
    shallow = profile_shapes(specs.unet_split(1)[1], engine_profiles(static.dims(8, 768, feature=(320, 1)), True))
    assert shallow[-1]["deep_feature"] == ((6, 320, 64, 64),) * 3


def test_a_static_bundles_tile_networks_run_at_its_one_size_in_float32():
    """The VAE tile networks: one static profile at the bundle's size (a tile of a larger picture is that size),
    the GroupNorm layers and groups fixed; built in float32."""
    from export.tensorrt_build import FP32_COMPONENTS

    static = specs.Profile((1, 1, 1), (512,) * 3, (512,) * 3)
    profiles = engine_profiles(static.dims(8, 768, norms=(22, 30, 32)), static=True)
    decoder = profile_shapes(specs.VAE_DECODER_TILE, profiles)
    assert decoder == [{"latents": ((1, 4, 64, 64),) * 3, "norm_stats": ((30, 1, 32, 2),) * 3,
                        "owned": ((1, 1, 64, 64),) * 3, "given_stats": ((1,),) * 3}]
    assert set(specs.TILE_COMPONENTS) <= set(FP32_COMPONENTS)


def test_the_matching_profile_is_chosen_by_input_shapes():
    from engine.backends.tensorrt_backend import matching_profile

    static = specs.Profile((1, 1, 1), (64,) * 3, (64,) * 3)
    profiles = profile_shapes(specs.UNET, engine_profiles(static.dims(8, 32), static=True))
    shapes = {"sample": (2, 8, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    assert matching_profile(shapes, profiles) == 1
    with pytest.raises(InputError, match="no optimisation profile"):
        matching_profile({**shapes, "timestep": (4,)}, profiles)


def test_engines_for_another_gpu_or_version_are_refused():
    shipped = read_bundle(DEFAULT_BUNDLE, verify=False).manifest
    manifest = dataclasses.replace(shipped, gpu=GPU, tools={"tensorrt": "10.13.0"})
    check_engine_compatible(manifest, "10.13.0", GPU)
    with pytest.raises(InputError, match="rebuild them here"):
        check_engine_compatible(manifest, "10.14.0", GPU)
    with pytest.raises(InputError, match="NVIDIA L4"):
        check_engine_compatible(manifest, "10.13.0", {"name": "NVIDIA L4", "compute_capability": "8.9"})


def test_tensorrt_export_says_what_is_missing(tiny_model, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the missing-package message cannot be checked")
    from export.bundle import ExportOptions, export_bundle

    with pytest.raises(InputError, match=r"pip install '\.\[tensorrt\]'"):
        export_bundle(tiny_model, tmp_path / "trt", ExportOptions(format="tensorrt", precision="fp16"))
    assert list(tmp_path.iterdir()) == []


def _tensorrt_gpu_reason():
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (it cannot be installed on the CPU-only CI machines)"
    try:
        from engine.backends.tensorrt_backend import current_gpu

        current_gpu()
    except Exception as err:  # no cuda-python, no driver, no GPU
        return f"no usable CUDA GPU ({err})"
    return None


@pytest.mark.tensorrt
@pytest.mark.skipif(_tensorrt_gpu_reason() is not None, reason=str(_tensorrt_gpu_reason()))
def test_tensorrt_bundle_edits_like_torch(tiny_model, tiny_pipe, tmp_path, image_file):
    import numpy as np

    from engine import EditPipeline
    from export.bundle import ExportOptions, export_bundle

    profile = specs.Profile((1, 1, 1), (64, 64, 64), (64, 64, 64))
    bundle, _ = export_bundle(tiny_model, tmp_path / "trt", ExportOptions("tensorrt", "fp16", profile))
    again, _ = export_bundle(tiny_model, tmp_path / "trt2", ExportOptions("tensorrt", "fp16", profile))
    assert (again / "unet.plan").read_bytes() == (bundle / "unet.plan").read_bytes()  # from the engine cache
    pipe = EditPipeline.from_pretrained(bundle, backend="tensorrt", device="cuda", progress=False)
    out = pipe.edit(image_file, "x", steps=4, seed=0, resolution=64, output_type="np").images
    ref = tiny_pipe.edit(image_file, "x", steps=4, seed=0, resolution=64, output_type="np").images
    assert 10 * np.log10(1 / np.mean((out - ref) ** 2)) >= 30
