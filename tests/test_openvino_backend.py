"""The OpenVINO backend on real exported bundles: torch's pictures in float32 and bfloat16, every row count and
the split UNet, batched images keeping their solo pixels, the model cache, the default choice, clear errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import EditPipeline, InputError
from engine.backends import bundle_runtime
from engine.cpu import native_dtype
from engine.manifest import read_bundle, sha256_file
from engine.pipeline import DEFAULT_BUNDLE, DEFAULT_MODEL

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[dev]')")

from engine.backends.openvino_backend import OpenVinoBackend, choose_precision, load  # noqa: E402

NATIVE_BF16 = native_dtype("bfloat16")
NO_BF16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bfloat16: the backend refuses it "
                             "(tested below)")
PRECISIONS = [("float32", 40.0), pytest.param("bfloat16", 30.0, marks=NO_BF16)]
DTYPES = ["float32", pytest.param("bfloat16", marks=NO_BF16)]


def psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


@pytest.fixture(scope="module")
def ov_pipes(onnx_bundles, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ov-cache")
    return {dtype: EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="openvino", dtype=dtype, progress=False,
                                                backend_options={"cache_dir": str(cache)})
            for dtype in (["float32", "bfloat16"] if NATIVE_BF16 else ["float32"])}


@pytest.mark.parametrize("dtype, floor", PRECISIONS)
@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_same_pictures_as_torch(tiny_pipe, ov_pipes, image_file, dtype, floor, sampler):
    kwargs = dict(steps=8, seed=11, sampler=sampler, output_type="np", resolution=None)
    ref = tiny_pipe.edit(image_file, "make it blue", **kwargs).images
    out = ov_pipes[dtype].edit(image_file, "make it blue", **kwargs).images
    assert out.shape == ref.shape and psnr(out, ref) >= floor


@pytest.mark.parametrize("dtype, floor", PRECISIONS)
@pytest.mark.parametrize("options", [dict(image_guidance=1.0), dict(adaptive_guidance=0.2),
                                     dict(guidance_interval=(1.0, 100.0)), dict(cache_interval=2)])
def test_every_row_count_and_the_split_unet(tiny_pipe, ov_pipes, rgb_image, dtype, floor, options):
    """One compiled network per component takes every row count the savings ask for, and the fp32 bundle's
    split UNet runs step caching: torch's pictures and torch's UNet work."""
    kwargs = dict(steps=6, seed=3, resolution=None, output_type="np", **options)
    images = [rgb_image, rgb_image.transpose(0)]
    ref = tiny_pipe.edit(images, ["make it blue", "add snow"], **kwargs)
    out = ov_pipes[dtype].edit(images, ["make it blue", "add snow"], **kwargs)
    assert out.unet_evaluations == ref.unet_evaluations  # work: the bundle counts MACs at its opt size
    assert out.unet_work == pytest.approx(ref.unet_work, rel=0.02)
    assert psnr(out.images, ref.images) >= floor


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batched_image_keeps_its_solo_pixels(ov_pipes, rgb_image, dtype):
    pipe = ov_pipes[dtype]
    kwargs = dict(steps=3, resolution=None, output_type="np")
    batch = pipe.edit([rgb_image, rgb_image.transpose(0)], "add snow", seed=[4, 9], **kwargs).images
    solo = pipe.edit(rgb_image.transpose(0), "add snow", seed=9, **kwargs).images
    np.testing.assert_array_equal(batch[1], solo[0])


@pytest.mark.parametrize("dtype, floor", PRECISIONS)
def test_the_shipped_bundle_gives_the_shipped_models_pictures(dtype, floor, tmp_path):
    """The shipped fp16 bundle on OpenVINO against the shipped model folder on torch float32."""
    kwargs = dict(seed=0, output_type="np")
    ref = EditPipeline.from_pretrained(DEFAULT_MODEL, backend="torch", progress=False)
    out = EditPipeline.from_pretrained(DEFAULT_BUNDLE, backend="openvino", dtype=dtype, progress=False,
                                       backend_options={"cache_dir": str(tmp_path)})
    example = Path(__file__).parent.parent / "examples" / "shapes.png"
    assert psnr(out.edit(example, "make the circle blue", **kwargs).images,
                ref.edit(example, "make the circle blue", **kwargs).images) >= floor


def test_precision_follows_the_cpu():
    assert choose_precision(None, frozenset({"avx512_bf16"})) == "bfloat16"
    assert choose_precision(None, frozenset({"avx2"})) == "float32"
    assert choose_precision("float32", frozenset({"avx512_bf16"})) == "float32"
    with pytest.raises(InputError, match="bfloat16 is emulated on this CPU .*--dtype float32"):
        choose_precision("bfloat16", frozenset({"avx2"}))
    with pytest.raises(InputError, match="computes in float32 or bfloat16, not 'float16'"):
        choose_precision("float16", frozenset({"avx512_fp16"}))


def test_threads_follow_omp_num_threads_and_the_compiled_networks_are_cached(onnx_bundles, monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    backend = load(read_bundle(onnx_bundles["fp32"]), dtype="float32", cache_dir=tmp_path / "cache")
    assert backend.threads == 1 and backend.compiled["unet"].get_property("INFERENCE_NUM_THREADS") == 1
    assert backend.value_bytes == 4
    assert backend.compiled["unet"].get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) >= 4  # one blob per component (the split UNet's included)
    load(read_bundle(onnx_bundles["fp32"]), dtype="float32", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached  # read back, not compiled again


def test_bfloat16_keeps_a_float32_decoder_for_the_overflow_fallback(onnx_bundles, tmp_path):
    if not NATIVE_BF16:
        pytest.skip("this CPU has no native bfloat16")
    backend = load(read_bundle(onnx_bundles["fp32"]), cache_dir=tmp_path)
    assert backend.precision == "bfloat16" and backend.has("vae_decoder_fp32") and backend.value_bytes == 2
    assert backend.compiled["vae_decoder_fp32"].get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"


def test_the_default_for_a_bundle_on_a_cpu_is_openvino(onnx_bundles, caplog):
    assert bundle_runtime("onnx", "cpu")[0] == "openvino"
    assert bundle_runtime("onnx", "cuda")[0] == "onnxruntime" and bundle_runtime("tensorrt", "cuda")[0] == "tensorrt"
    with caplog.at_level("INFO", logger="engine"):
        pipe = EditPipeline.from_pretrained(onnx_bundles["fp32"], progress=False)
    assert isinstance(pipe.backend, OpenVinoBackend) and "running on openvino" in caplog.text


def test_a_graph_openvino_cannot_read_is_named_with_the_fix(onnx_bundles, tmp_path):
    bundle = Path(shutil.copytree(onnx_bundles["fp32"], tmp_path / "b"))
    graph = bundle / "vae_encoder.onnx"
    graph.write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["components"]["vae_encoder"]["files"][0]
    entry["sha256"], entry["bytes"] = sha256_file(graph), graph.stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"vae_encoder.onnx: OpenVINO cannot read this graph .*--backend onnxruntime"):
        EditPipeline.from_pretrained(bundle, backend="openvino", backend_options={"cache_dir": str(tmp_path / "c")})
    with pytest.raises(InputError, match="runs on 'cpu'"):
        EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="openvino", device="cuda")


def test_cli_edit_and_info_say_which_runtime(onnx_bundles, image_file, tmp_path):
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "ip2p.cli", "edit", image_file, "-p", "x", "-o", str(out),
                           "--model", onnx_bundles["fp16"], "--steps", "2", "--resolution", "none"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and out.is_file(), done.stderr
    info = subprocess.run([sys.executable, "-m", "ip2p.cli", "info", onnx_bundles["fp32"]], capture_output=True,
                          text=True, timeout=120).stdout
    assert f"runtime here: openvino in {'bfloat16' if NATIVE_BF16 else 'float32'}" in info
    refused = subprocess.run([sys.executable, "-m", "ip2p.cli", "edit", image_file, "-p", "x", "-o", str(out),
                              "--model", onnx_bundles["fp32"], "--backend", "openvino", "--dtype", "float16"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "float16" in refused.stderr
