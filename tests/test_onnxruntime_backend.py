"""The minimal runtime on real exported bundles: same pictures as torch, clear errors, no torch needed."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine import EditPipeline, InputError
from engine.backends.onnxruntime_backend import BoundSession, choose_providers
from engine.cpu import default_threads, physical_cores


def psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


@pytest.fixture(scope="module")
def ort_pipes(onnx_bundles):
    return {p: EditPipeline.from_pretrained(b, backend="onnxruntime", progress=False) for p, b in onnx_bundles.items()}


@pytest.mark.parametrize("precision, floor", [("fp32", 40.0), ("fp16", 30.0)])
@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_same_pictures_as_torch(tiny_pipe, ort_pipes, image_file, precision, floor, sampler):
    kwargs = dict(steps=8, seed=11, sampler=sampler, output_type="np", resolution=None)
    ref = tiny_pipe.edit(image_file, "make it blue", **kwargs).images
    out = ort_pipes[precision].edit(image_file, "make it blue", **kwargs).images
    assert ort_pipes[precision].backend.value_bytes == {"fp32": 4, "fp16": 2}[precision]
    assert out.shape == ref.shape and psnr(out, ref) >= floor


def test_batches_over_the_profile_are_split_and_match_singles(ort_pipes, rgb_image):
    pipe = ort_pipes["fp32"]
    batch = pipe.edit([rgb_image] * 3, "add snow", steps=2, seed=4, resolution=None, output_type="np")
    single = pipe.edit(rgb_image, "add snow", steps=2, seed=6, resolution=None, output_type="np")
    np.testing.assert_allclose(batch.images[2], single.images[0], atol=1e-5)


def test_sizes_outside_the_profile_state_the_range(ort_pipes, rgb_image):
    with pytest.raises(InputError, match="width 32-128, height 32-128"):
        ort_pipes["fp32"].edit(rgb_image, "x", resolution=256)


def test_io_binding_gives_the_same_pictures_and_uploads_the_text_once(onnx_bundles, ort_pipes, rgb_image):
    """The GPU path (persistent bound buffers, in-place input updates) run on CPU buffers."""
    bound = EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", progress=False,
                                         backend_options={"io_binding": True})
    unet = bound.backend.bound["unet"]
    kwargs = dict(steps=4, seed=2, resolution=None, output_type="np")
    for size, prompt in ((64, "make it blue"), (32, "make it red"), (64, "make it blue")):  # shapes change, return
        image = rgb_image.resize((size, size))
        ref = ort_pipes["fp32"].edit(image, prompt, **kwargs).images
        before = unet.copies
        out = bound.edit(image, prompt, **kwargs).images
        np.testing.assert_allclose(out, ref, atol=1e-5)
        # first step binds 3 fresh buffers (new shapes) or updates 3 inputs; later steps skip the embeddings
        assert unet.copies - before == 3 + 3 * 2
    values = unet.buffers()
    bound.edit(rgb_image.resize((64, 64)), "make it blue", **kwargs)
    assert unet.buffers() == values and len(unet.signatures) == 1  # same shapes: same buffers; one binding kept


def test_bound_session_reuses_its_buffers_and_never_writes_into_the_callers_arrays():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = BoundSession(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), "cpu")
    first = np.arange(4, dtype=np.float32)
    first.flags.writeable = False  # a constant: uploaded once while it is passed again
    np.testing.assert_array_equal(session.run({"a": first, "b": np.ones(4, np.float32)})["c"], first + 1)
    buffers = session.buffers()
    np.testing.assert_array_equal(session.run({"a": first, "b": np.full(4, 2, np.float32)})["c"], first + 2)
    assert session.copies == 3
    second = np.full(4, 10, np.float32)
    np.testing.assert_array_equal(session.run({"a": second, "b": np.zeros(4, np.float32)})["c"], second)
    assert session.buffers() == buffers and session.copies == 5
    np.testing.assert_array_equal(first, np.arange(4))  # its old buffer was overwritten, not the array
    np.testing.assert_array_equal(session.run({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)})["c"], 2)
    assert len(session.signatures) == 1  # without graphs, only the latest shapes keep a binding
    onnx.checker.check_model(model)


def test_with_graphs_every_signature_keeps_its_buffers_and_its_own_graph_id():
    """CUDA graphs' bookkeeping, checked on CPU buffers (the CPU provider ignores the graph id): one capture
    per input signature, each replayed on addresses that never change."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["c"])], "mul",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = BoundSession(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), "cpu",
                           graphs=True)
    addresses = {}
    for rows in (3, 2, 1, 3, 2):  # adaptive guidance: 3B, then 2B, then B rows; the next edit starts again
        out = session.run({"a": np.full(rows, 2, np.float32), "b": np.arange(rows, dtype=np.float32)})["c"]
        np.testing.assert_array_equal(out, 2 * np.arange(rows))
        signature = next(s for s in session.signatures if s[0][1] == (rows,))
        assert addresses.setdefault(rows, session.buffers(signature)) == session.buffers(signature)
    assert [s[0][1] for s in session.signatures] == [(3,), (2,), (1,)]
    graph_ids = [session._bindings[s].run_options.get_run_config_entry("gpu_graph_id") for s in session.signatures]
    assert graph_ids == ["1", "2", "3"]


def test_cuda_graphs_are_refused_where_they_cannot_work(onnx_bundles):
    with pytest.raises(InputError, match="CUDA graphs run on a CUDA device"):
        EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", backend_options={"cuda_graph": True})
    with pytest.raises(InputError, match="static-shape bundle"):
        EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", device="cuda",
                                     backend_options={"cuda_graph": True})


def test_text_embeddings_are_cached(ort_pipes, rgb_image):
    pipe = ort_pipes["fp32"]
    pipe.edit(rgb_image, "make it red", steps=1, seed=0, resolution=None)
    assert "make it red" in pipe._text_cache
    cached = pipe._text_cache["make it red"]
    pipe.edit(rgb_image, "make it red", steps=1, seed=0, resolution=None)
    assert pipe._text_cache["make it red"] is cached


@pytest.mark.parametrize("option, value, key, entry", [
    ("spin", False, "session.intra_op.allow_spinning", "0"), ("spin", True, "session.intra_op.allow_spinning", "1"),
    ("spin_after_run", False, "session.force_spinning_stop", "1"),
    ("spin_after_run", True, "session.force_spinning_stop", "0")])
def test_spin_sets_whether_idle_cpu_threads_busy_wait(onnx_bundles, ort_pipes, rgb_image, option, value, key, entry):
    pipe = EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", backend_options={option: value},
                                        progress=False)
    options = pipe.backend._sessions["unet"].get_session_options()
    assert options.get_session_config_entry(key) == entry
    edit = dict(image=rgb_image, instruction="make it blue", steps=2, seed=0)
    np.testing.assert_array_equal(np.asarray(pipe.edit(**edit).images[0]),
                                  np.asarray(ort_pipes["fp32"].edit(**edit).images[0]))  # the same numbers


def test_backend_and_model_kind_must_agree(onnx_bundles, tiny_model):
    with pytest.raises(InputError, match="run it with backend onnxruntime, openvino, tensorrt"):
        EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="torch")
    with pytest.raises(InputError, match="export it first"):
        EditPipeline.from_pretrained(tiny_model, backend="onnxruntime")
    with pytest.raises(InputError, match="this bundle is fp32, not float16"):
        EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", dtype="float16")
    with pytest.raises(InputError, match="a onnx bundle"):
        EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="tensorrt", device="cuda")


def test_missing_or_corrupted_files_are_named(onnx_bundles, tmp_path):
    bundle = Path(shutil.copytree(onnx_bundles["fp32"], tmp_path / "b"))
    data = bytearray((bundle / "vae_decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle / "vae_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"vae_decoder.onnx: corrupted \(sha256"):
        EditPipeline.from_pretrained(bundle, backend="onnxruntime")
    (bundle / "vae_decoder.onnx").unlink()
    with pytest.raises(InputError, match="vae_decoder.onnx: listed in the manifest but missing"):
        EditPipeline.from_pretrained(bundle, backend="onnxruntime")
    (bundle / "manifest.json").unlink()
    with pytest.raises(InputError, match="export it first"):  # no manifest: not a bundle
        EditPipeline.from_pretrained(bundle, backend="onnxruntime")


def test_provider_choice():
    assert choose_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    gpu = choose_providers("cuda:1", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [p[0] if isinstance(p, tuple) else p for p in gpu] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu[1][1]["device_id"] == 1 and "enable_cuda_graph" not in gpu[1][1]
    graphs = choose_providers("cuda", ["TensorrtExecutionProvider", "CUDAExecutionProvider"], cuda_graph=True)
    assert graphs[0][1]["trt_cuda_graph_enable"] is True and graphs[1][1]["enable_cuda_graph"] == "1"
    with pytest.raises(InputError, match="no CUDA provider"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(InputError, match="not available"):
        choose_providers("cpu", ["CPUExecutionProvider"], requested=["CUDAExecutionProvider"])
    assert 1 <= physical_cores() <= (__import__("os").cpu_count() or 1)


def test_threads_follow_omp_num_threads_where_it_is_set(onnx_bundles, monkeypatch):
    """Ray sets $OMP_NUM_THREADS to each replica's CPUs (torch reads it): onnxruntime's sessions follow it."""
    from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
    from engine.manifest import read_bundle

    for value in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert default_threads() == physical_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    backend = OnnxRuntimeBackend(read_bundle(onnx_bundles["fp32"]), ["CPUExecutionProvider"])
    assert backend._sessions["unet"].get_session_options().intra_op_num_threads == 1
    threads = OnnxRuntimeBackend(read_bundle(onnx_bundles["fp32"]), ["CPUExecutionProvider"], threads=2)
    assert threads._sessions["unet"].get_session_options().intra_op_num_threads == 2  # asked for: as asked


def test_cli_edit_with_a_bundle(onnx_bundles, image_file, tmp_path):
    from ip2p.cli import main

    out = tmp_path / "out.png"
    assert main(["-q", "edit", image_file, "-p", "x", "-o", str(out), "--model", onnx_bundles["fp16"],
                 "--backend", "onnxruntime", "--steps", "2", "--resolution", "none"]) == 0
    assert out.is_file()


BLOCKED_RUN = textwrap.dedent("""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    from engine import EditPipeline
    pipe = EditPipeline.from_pretrained(sys.argv[1], backend="onnxruntime", progress=False)
    result = pipe.edit(sys.argv[2], "make it blue", steps=3, seed=1, resolution=None)
    result.images[0].save(sys.argv[3])
    assert not any(m.split(".")[0] in ("torch", "diffusers", "transformers") for m in sys.modules)
""")


def test_full_edit_without_torch_or_diffusers(onnx_bundles, image_file, tmp_path):
    out = tmp_path / "edited.png"
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, onnx_bundles["fp32"], image_file, str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0


def test_the_tensorrt_provider_is_offered_only_where_tensorrt_loads():
    from engine.backends.onnxruntime_backend import tensorrt_loadable, usable_providers

    assert not tensorrt_loadable("libnvinfer-absent.so.10") and tensorrt_loadable("libc.so.6")
    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]  # onnxruntime-gpu's list
    assert usable_providers(listed, lambda: False) == listed[1:]
    assert usable_providers(listed, lambda: True) == listed
    assert usable_providers(["CPUExecutionProvider"], lambda: 1 / 0) == ["CPUExecutionProvider"]  # not probed


@pytest.mark.parametrize("options", [dict(image_guidance=1.0), dict(text_guidance=1.5, image_guidance=1.5),
                                     dict(adaptive_guidance=0.2), dict(guidance_interval=(1.0, 100.0))])
def test_bundles_take_the_rows_each_saving_asks_for(tiny_pipe, ort_pipes, rgb_image, options):
    """Dynamic bundles run any UNet row count from B to 3B: the savings give torch's pictures and work."""
    kwargs = dict(steps=6, seed=3, resolution=None, output_type="np", **options)
    images = [rgb_image, rgb_image.transpose(0)]
    ref = tiny_pipe.edit(images, ["make it blue", "add snow"], **kwargs)
    out = ort_pipes["fp32"].edit(images, ["make it blue", "add snow"], **kwargs)
    assert out.unet_evaluations == ref.unet_evaluations and max(out.unet_evaluations) < 18
    assert psnr(out.images, ref.images) >= 40


@pytest.fixture(scope="module")
def static_bundle(tiny_model, tmp_path_factory):
    """A fixed-shape bundle (one 64x64 image), as CUDA graphs need."""
    from engine.specs import Profile
    from export.bundle import ExportOptions, export_bundle

    profile = Profile(batch=(1, 1, 1), height=(64, 64, 64), width=(64, 64, 64))
    return str(export_bundle(tiny_model, tmp_path_factory.mktemp("static") / "b",
                             ExportOptions(precision="fp32", profile=profile), progress=False)[0])


@pytest.mark.parametrize("options", [dict(image_guidance=1.0), dict(adaptive_guidance=0.2)])
def test_static_bundles_take_every_row_count_with_one_graph_binding_each(tiny_pipe, static_bundle, rgb_image,
                                                                         options):
    """A static bundle fixes every axis but the UNet rows: the savings run on it, and CUDA graph mode's
    bindings (one per row count, each its own gpu_graph_id; run here on CPU buffers) give torch's pictures."""
    from engine.backends.onnxruntime_backend import OnnxRuntimeBackend
    from engine.manifest import read_bundle
    from engine.tokenizer import ClipTokenizer

    bundle = read_bundle(static_bundle)
    sample = bundle.manifest.components["unet"].inputs[0]
    assert bundle.profile.static and (sample.shapes[0][0], sample.shapes[2][0]) == (1, 3)  # UNet rows B to 3B
    graphed = EditPipeline(OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"], io_binding=True, cuda_graph=True),
                           bundle.model, ClipTokenizer(bundle.tokenizer_dir), progress=False,
                           null_embedding=np.load(bundle.null_embedding_file), profile=bundle.profile)
    kwargs = dict(steps=6, seed=3, resolution=None, output_type="np", **options)
    image = rgb_image.resize((64, 64))
    ref = tiny_pipe.edit(image, "make it blue", **kwargs)
    for _ in range(2):  # captures, then replays
        out = graphed.edit(image, "make it blue", **kwargs)
        assert out.unet_evaluations == ref.unet_evaluations and out.unet_evaluations[0] < 18
        assert psnr(out.images, ref.images) >= 40
    rows = sorted(signature[0][1][0] for signature in graphed.backend.bound["unet"].signatures)
    if "image_guidance" in options:
        assert rows == [2]  # s_I = 1: cond and image branches, every step
    else:
        assert rows[-1] == 3 and len(rows) >= 2  # all branches first, fewer once guidance has converged


def test_a_static_bundle_of_an_older_export_taking_only_3b_rows_is_refused(static_bundle, tmp_path, capsys):
    """Older exports fixed a static bundle's UNet rows at 3B: reading one asks, in one line, to export it again."""
    from engine.manifest import read_bundle
    from ip2p.cli import main
    from tests.conftest import cli_error

    old = Path(shutil.copytree(static_bundle, tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    for tensor in unet["inputs"] + unet["outputs"]:
        if tensor["dims"][0] == "N":
            tensor["shapes"] = [[3, *shape[1:]] for shape in tensor["shapes"]]
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(InputError, match="UNet taking only 3B rows; export it again with `ip2p export`"):
        read_bundle(old)
    assert main(["info", str(old)]) == 2
    assert "manifest.json: a static bundle of an older export" in cli_error(capsys)


def test_the_vae_sessions_allocate_outside_onnxruntimes_arena(ort_pipes):
    """The arena keeps what a session's largest call held: the VAE's full-size pictures would stay resident."""
    sessions = ort_pipes["fp32"].backend._sessions
    arenas = {name: session.get_session_options().enable_cpu_mem_arena for name, session in sessions.items()}
    assert arenas == {name: not name.startswith("vae_") for name in sessions} and arenas["unet"]
