"""The torch pipeline and training on a CUDA GPU: the same pictures as on the CPU, flat memory, fp16 parity.
Skipped, with the reason, where torch sees no CUDA GPU (run on one with ``pytest -m gpu``)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import EditPipeline, InputError
from training.evaluation import psnr

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]

DEVICE = "cuda"
PROMPT = "make the circle blue"
EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "shapes.png")


def photo(height=48, width=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def edit(pipe, prompt=PROMPT, **kwargs):
    args = dict(steps=6, seed=3, resolution=None, output_type="np")
    return pipe.edit(photo(), prompt, **{**args, **kwargs}).images


@pytest.fixture(scope="module")
def cpu_pipe(tiny_model):
    return EditPipeline.from_pretrained(tiny_model, progress=False)


@pytest.mark.parametrize("dtype, min_db", [("float32", 40.0), ("float16", 30.0), ("bfloat16", 25.0)])
def test_cuda_edit_matches_the_cpu_float32_edit(tiny_model, cpu_pipe, dtype, min_db):
    """Same seed, same noise (drawn on the host): the GPU edit is the CPU float32 edit up to precision."""
    gpu = EditPipeline.from_pretrained(tiny_model, device=DEVICE, dtype=dtype, progress=False)
    ours = edit(gpu)
    assert np.isfinite(ours).all()
    assert psnr(ours, edit(cpu_pipe), peak=1.0) >= min_db


@pytest.fixture
def no_tf32():
    """Full float32 convolutions and matmuls (torch lets cuDNN use TF32 by default: about 1e-3 per pixel)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_float32_matches_diffusers_on_cuda(tiny_model, no_tf32):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False).to(DEVICE)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    gpu = EditPipeline.from_pretrained(tiny_model, device=DEVICE, dtype="float32", progress=False)
    f = gpu.model.vae_factor
    latents = np.random.default_rng(1).standard_normal((1, 4, 48 // f, 64 // f)).astype(np.float32)
    ours = edit(gpu, sampler="euler", latents=latents)
    theirs = ref(PROMPT, image=photo(), num_inference_steps=6, latents=torch.from_numpy(latents).to(DEVICE),
                 output_type="np").images
    assert ours.shape == theirs.shape == (1, 48, 64, 3)
    assert np.abs(ours - theirs).max() < 1e-3


def test_cuda_defaults_to_float16_channels_last():
    from engine.backends import torch_backend

    backend = EditPipeline.from_pretrained(device=DEVICE, progress=False).backend
    unet = backend._modules["unet"][0]
    assert backend.dtype == torch.float16 and backend.value_bytes == 2
    assert next(p for p in unet.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    assert set(torch_backend.CHANNELS_LAST_ON_CUDA) >= {"unet", "vae_decoder"}


def test_compiled_cuda_graphs_give_the_eager_pictures_and_warmup_captures_every_shape(tiny_model):
    """compile on CUDA: UNet and decoder compiled, each shape a CUDA graph (on by default); after warm-up at a size
    the edits there (exact and the presets' adaptive row counts) compile and capture nothing new; the pictures
    are the eager float16 ones up to rounding."""
    from torch._dynamo.utils import counters

    eager = EditPipeline.from_pretrained(tiny_model, device=DEVICE, progress=False)
    graphed = EditPipeline.from_pretrained(tiny_model, device=DEVICE, progress=False,
                                           backend_options={"compile": True})
    assert graphed.backend.graphs and graphed.backend.dtype == torch.float16
    graphed.warmup([(64, 48)])
    graphs = counters["stats"]["unique_graphs"]
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]  # grows with each graph recorded
    assert recorded > 0  # in the warm-up: graph trees record at a shape's second call, and it ran each twice
    for preset in ("exact", "balanced", "fast"):
        for seed in (0, 1):  # the second replays the first's graphs with new inputs
            a, b = edit(graphed, preset=preset, seed=seed), edit(eager, preset=preset, seed=seed)
            assert np.isfinite(a).all() and psnr(a, b, peak=1.0) >= 35.0
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == recorded
    assert len(graphed.backend.shapes["unet"]) == 3


def test_compiled_without_graphs_on_cuda(tiny_model):
    pipe = EditPipeline.from_pretrained(tiny_model, device=DEVICE, progress=False,
                                        backend_options={"compile": True, "graphs": False})
    assert not pipe.backend.graphs and np.isfinite(edit(pipe)).all()


def test_cuda_memory_stays_flat_across_edits_of_varying_sizes(tiny_model):
    gpu = EditPipeline.from_pretrained(tiny_model, device=DEVICE, dtype="float16", progress=False)
    sizes = [(32, 48), (64, 64), (40, 96), (96, 40)]
    after = []
    for cycle in range(3):
        for i, (h, w) in enumerate(sizes):
            gpu.edit(photo(h, w, seed=i), f"edit {i}", steps=2, seed=cycle, resolution=None)
        torch.cuda.synchronize()
        after.append((torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))
    assert after[1] == after[2], after  # nothing held or grown once every size has run


def test_kv_downsampling_runs_on_cuda_in_float16(tiny_model):
    exact = EditPipeline.from_pretrained(tiny_model, device=DEVICE, dtype="float16", progress=False)
    pooled = EditPipeline.from_pretrained(tiny_model, device=DEVICE, dtype="float16", progress=False,
                                          backend_options={"kv_downsample": 2})
    a, b = edit(exact, resolution=64), edit(pooled, resolution=64)
    assert np.isfinite(b).all() and 0 < np.abs(a - b).max() < 0.5  # an approximation of the same edit


def test_shipped_model_edits_the_example_the_same_on_cuda_float16():
    cpu = EditPipeline.from_pretrained(progress=False)
    gpu = EditPipeline.from_pretrained(device=DEVICE, dtype="float16", progress=False)
    args = dict(steps=20, seed=0, output_type="np")
    a = cpu.edit(EXAMPLE, PROMPT, **args).images
    b = gpu.edit(EXAMPLE, PROMPT, **args).images
    assert psnr(a, b, peak=1.0) >= 30.0


def test_training_steps_run_on_cuda_with_mixed_precision(tiny_model, tmp_path):
    from training.config import TrainConfig
    from training.train import train

    data = tmp_path / "pairs"
    data.mkdir()
    rows = []
    for i in range(8):
        before = np.full((32, 32, 3), 128, np.uint8)
        after = before.copy()
        before[4 + i:16 + i, 8:20] = (220, 30, 30)
        after[4 + i:16 + i, 8:20] = (30, 30, 220)
        Image.fromarray(before).save(data / f"in{i}.png")
        Image.fromarray(after).save(data / f"out{i}.png")
        rows.append({"input_image": f"in{i}.png", "edit_prompt": "make the square blue", "edited_image": f"out{i}.png"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = train(TrainConfig(base=tiny_model, data=str(data), output=str(tmp_path / "out"), resolution=32,
                            batch_size=4, max_steps=6, log_every=3, checkpoint_every=0, mixed_precision="bf16",
                            seed=0))
    losses = [float(r.split(",")[1]) for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    pipe = EditPipeline.from_pretrained(out, device=DEVICE, dtype="float16", progress=False)
    assert np.isfinite(edit(pipe)).all()


def onnxruntime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


ort_on_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not onnxruntime_has_cuda(),
                                 reason="needs a CUDA GPU and onnxruntime-gpu (this onnxruntime has no CUDA provider)")


@pytest.fixture(scope="module")
def static_bundle(tiny_model, tmp_path_factory):
    """A fp32 bundle of one fixed shape (one 48x64 image), as CUDA graphs need."""
    from engine.specs import Profile
    from export.bundle import ExportOptions, export_bundle

    profile = Profile(batch=(1, 1, 1), height=(48, 48, 48), width=(64, 64, 64))
    return str(export_bundle(tiny_model, tmp_path_factory.mktemp("static") / "b",
                             ExportOptions(precision="fp32", profile=profile))[0])


@ort_on_cuda
@pytest.mark.parametrize("precision, min_db", [("fp32", 40.0), ("fp16", 30.0)])
def test_onnxruntime_on_cuda_matches_the_torch_edit(onnx_bundles, cpu_pipe, precision, min_db):
    pipe = EditPipeline.from_pretrained(onnx_bundles[precision], backend="onnxruntime", device=DEVICE, progress=False)
    assert pipe.backend._sessions["unet"].get_providers()[0] == "CUDAExecutionProvider"
    assert pipe.backend.bound  # IO binding on a GPU
    assert psnr(edit(pipe), edit(cpu_pipe), peak=1.0) >= min_db


@ort_on_cuda
def test_onnxruntime_on_cuda_keeps_its_device_buffers_and_uploads_the_text_once(onnx_bundles):
    pipe = EditPipeline.from_pretrained(onnx_bundles["fp16"], backend="onnxruntime", device=DEVICE, progress=False)
    unet = pipe.backend.bound["unet"]
    edit(pipe)
    buffers, before = unet.buffers(), unet.copies
    edit(pipe, seed=4)
    assert unet.buffers() == buffers
    assert unet.copies - before == 3 + 2 * 5  # step 1: all three inputs; steps 2-6: sample and timestep only


@ort_on_cuda
def test_onnxruntime_gpu_memory_stays_flat_across_edits_of_varying_sizes(onnx_bundles):
    pipe = EditPipeline.from_pretrained(onnx_bundles["fp16"], backend="onnxruntime", device=DEVICE, progress=False)
    sizes = [(32, 48), (64, 64), (40, 96), (96, 40), (128, 128)]
    used = []
    for cycle in range(3):
        for i, (h, w) in enumerate(sizes):
            pipe.edit(photo(h, w, seed=i), f"edit {i}", steps=2, seed=cycle, resolution=None)
        free, total = torch.cuda.mem_get_info()
        used.append(total - free)
    assert used[2] - used[1] <= 4 * 2**20, used  # no growth once every size has run


@ort_on_cuda
def test_onnxruntime_cuda_graph_replays_a_static_bundle(static_bundle):
    plain = EditPipeline.from_pretrained(static_bundle, backend="onnxruntime", device=DEVICE, progress=False)
    graphed = EditPipeline.from_pretrained(static_bundle, backend="onnxruntime", device=DEVICE, progress=False,
                                           backend_options={"cuda_graph": True})
    options = graphed.backend._sessions["unet"].get_provider_options()["CUDAExecutionProvider"]
    assert options["enable_cuda_graph"] == "1"
    for seed, prompt in ((3, PROMPT), (5, "make it red"), (3, PROMPT)):  # capture, then replays
        np.testing.assert_allclose(edit(graphed, prompt, seed=seed), edit(plain, prompt, seed=seed), atol=1e-4)
    for _ in range(2):  # adaptive guidance: the UNet's rows fall from 3 to fewer; a graph is captured per count
        np.testing.assert_allclose(edit(graphed, PROMPT, seed=3, adaptive_guidance=0.2),
                                   edit(plain, PROMPT, seed=3, adaptive_guidance=0.2), atol=1e-4)
    assert len(graphed.backend.bound["unet"].signatures) >= 2
    with pytest.raises(InputError, match="outside this bundle's profile: width 64-64, height 48-48"):
        graphed.edit(photo(64, 64), PROMPT, steps=2, seed=0, resolution=None)
