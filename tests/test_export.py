"""ip2p export on the tiny model: real ONNX files, real ONNX Runtime sessions."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.errors import ExportError, InputError
from engine.manifest import MANIFEST_NAME, read_bundle, sha256_file
from engine.specs import COMPONENTS, TILE_COMPONENTS, Profile, component_spec, unet_split
from export.bundle import ExportOptions, export_bundle
from export.onnx_export import FP32_OPS
from tests.conftest import model_copy


def test_bundle_contents_and_manifest(onnx_bundles, tiny_model):
    bundle = read_bundle(onnx_bundles["fp32"])
    manifest = bundle.manifest
    split = [spec.name for spec in unet_split(1)]  # exported with --step-cache 1
    assert set(manifest.components) == set(COMPONENTS) | set(TILE_COMPONENTS) | set(split)
    for name, entry in manifest.components.items():
        graph = onnx.load(bundle.component_file(name))
        assert [i.name for i in graph.graph.input] == list(component_spec(name).input_names)
        assert [o.name for o in graph.graph.output] == list(component_spec(name).output_names)
        assert entry.files[0].sha256 == sha256_file(bundle.component_file(name))
    feature = manifest.components["unet_shallow_d1"].inputs[3]
    assert feature.name == "deep_feature" and feature.shapes[0][0] == 1 and feature.shapes[2][2:] == (64, 64)
    macs = {name: entry.macs.per_row for name, entry in manifest.components.items() if entry.macs is not None}
    assert macs["unet"] == macs["unet_full_d1"] > macs["unet_shallow_d1"] > 0
    unet = manifest.components["unet"].inputs[0]
    assert unet.name == "sample" and unet.shapes == ((1, 8, 16, 16), (3, 8, 32, 32), (6, 8, 64, 64))
    assert manifest.model.scaling_factor == 0.18215 and manifest.model.scheduler["steps_offset"] == 1
    assert set(manifest.tools) >= {"torch", "onnx", "onnxruntime", "opset"}
    assert len(manifest.source.weights_sha256) == 64 and manifest.gpu is None
    null = np.load(bundle.null_embedding_file)
    assert null.shape == (1, 77, 32) and null.dtype == np.float32
    assert (bundle.tokenizer_dir / "vocab.json").is_file()
    assert all(v.max_rel <= 1e-4 for v in manifest.verification)
    checked = {(v.component, v.shapes) for v in manifest.verification if v.component == "unet"}
    assert len(checked) == 2  # batch 3 at two resolutions


def test_fp16_graphs_keep_float32_io_and_normalisations(onnx_bundles):
    bundle = read_bundle(onnx_bundles["fp16"])
    graph = onnx.load(bundle.component_file("unet"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    types = {t.name: t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types.values()
    norms = [n for n in graph.graph.node if n.op_type in FP32_OPS]
    assert norms  # the graph has normalisations, and they were kept in float32 (ops are blocked by type)
    assert all(v.max_rel <= 1e-2 for v in bundle.manifest.verification)
    stress = [v for v in bundle.manifest.verification if v.shapes == "stress latents"]
    assert stress and stress[0].max_rel <= 1e-2


def test_existing_output_needs_force(onnx_bundles, tiny_model):
    with pytest.raises(InputError, match="already exists; pass --force"):
        export_bundle(tiny_model, onnx_bundles["fp32"], ExportOptions())


def test_bad_options_are_refused(tiny_model, tmp_path):
    with pytest.raises(InputError, match="not supported for format tensorrt"):
        ExportOptions(format="tensorrt", precision="fp32")
    with pytest.raises(InputError, match="unknown format"):
        ExportOptions(format="coreml")
    with pytest.raises(InputError, match="min <= opt <= max"):
        export_bundle(tiny_model, tmp_path / "b", ExportOptions(profile=Profile((4, 4, 1), (64,) * 3, (64,) * 3)))
    with pytest.raises(InputError, match="does not exist"):
        export_bundle(tiny_model, tmp_path / "missing" / "b", ExportOptions())
    assert list(tmp_path.iterdir()) == []


def test_not_an_instruct_pix2pix_model(tiny_model, tmp_path):
    copy = model_copy(tiny_model, tmp_path / "m", {"in_channels": 4})
    with pytest.raises(InputError, match="4-channel"):
        export_bundle(copy, tmp_path / "out", ExportOptions())
    assert not (tmp_path / "out").exists()


def test_failed_component_leaves_nothing(tiny_model, tmp_path):
    """A UNet with NaN weights exports, but fails verification: the error names the component and
    neither a manifest nor a partial folder is left behind."""

    from safetensors.torch import load_file, save_file

    copy = model_copy(tiny_model, tmp_path / "m")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = state["conv_out.bias"] * float("nan")
    save_file(state, weights)
    profile = Profile((1, 1, 1), (64, 64, 64), (64, 64, 64))
    with pytest.raises(ExportError, match="unet: verification failed"):
        export_bundle(copy, tmp_path / "out", ExportOptions(profile=profile, verify=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_large_weights_go_to_external_data(tiny_model, tmp_path):
    """The path sd15's 3.4 GB UNet takes, exercised on the tiny UNet with a low threshold."""
    import onnxruntime as ort

    from engine import specs
    from engine.backends.torch_modules import load_networks, wrap_components
    from engine.checkpoints import ModelSource
    from export.onnx_export import convert_to_fp16, export_onnx

    unet = wrap_components(*load_networks(ModelSource(Path(tiny_model))))["unet"]
    dims = Profile((1, 1, 1), (64,) * 3, (64,) * 3).dims(2, 32)
    files = export_onnx(unet, specs.UNET, dims, 2, tmp_path / "unet.fp32.onnx", external_over=1000)
    assert [f.name for f in files] == ["unet.fp32.onnx", "unet.fp32.onnx.data"]
    half = convert_to_fp16(files[0], tmp_path / "unet.onnx", external_over=1000)
    assert [f.name for f in half] == ["unet.onnx", "unet.onnx.data"]
    for path in (files[0], half[0]):
        out = ort.InferenceSession(str(path)).run(None, {
            "sample": np.zeros((3, 8, 32, 32), np.float32), "timestep": np.full(3, 10.0, np.float32),
            "encoder_hidden_states": np.zeros((3, 77, 32), np.float32)})[0]
        assert out.shape == (3, 4, 32, 32) and np.isfinite(out).all()


@pytest.mark.slow
def test_sd15_exports_and_verifies(tmp_path):
    """The real architecture: 3.4 GB UNet in external data, verified against torch (about 4 minutes)."""
    from engine.random_models import create_model

    model = create_model("sd15", tmp_path / "sd15")
    profile = Profile((1, 1, 1), (256, 256, 512), (256, 256, 512))
    bundle, checks = export_bundle(model, tmp_path / "bundle", ExportOptions(profile=profile, verify=True))
    manifest = read_bundle(bundle).manifest
    assert [f.path for f in manifest.components["unet"].files] == ["unet.onnx", "unet.onnx.data"]
    assert all(c.passed for c in checks) and {c.component for c in checks} == set(COMPONENTS)


def test_repeated_cast_nodes_of_older_float16_converters_are_dropped():
    """onnxruntime < 1.32's float16 converter casts a tensor once per float32-only use, repeating one node."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.onnx_export import drop_repeated_nodes

    cast = helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], to=TensorProto.FLOAT, name="x_cast_to_fp32_node")
    graph = helper.make_graph(
        [cast, helper.make_node("Relu", ["x_cast_to_fp32"], ["a"], name="relu"), cast,
         helper.make_node("Neg", ["x_cast_to_fp32"], ["b"], name="neg")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"],
        value_info=[helper.make_tensor_value_info("x_cast_to_fp32", TensorProto.FLOAT, [2])] * 2)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(Exception, match="same node name"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert drop_repeated_nodes(model.graph) == 1 and len(model.graph.value_info) == 1
    assert drop_repeated_nodes(model.graph) == 0
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = session.run(None, {"x": np.array([-1, 2], np.float16)})
    np.testing.assert_array_equal(a, [0, 2])
    np.testing.assert_array_equal(b, [1, -2])


def test_a_model_saved_by_the_libraries_exports_verified_over_an_old_bundle_and_runs_in_onnxruntime(
        saved_models, onnx_bundles, image_file, tmp_path, capsys):
    """ip2p export --verify --force of a save_pretrained folder (tokenizer.json only, fp16 variant files) over an
    existing bundle, which it replaces whole; then the bundle through the ONNX runtime: the same picture as
    torch."""
    import shutil

    from engine import EditPipeline
    from ip2p.cli import main

    out = Path(shutil.copytree(onnx_bundles["fp32"], tmp_path / "bundle"))  # with step caching's two UNets
    assert main(["-q", "export", saved_models["fp16"], str(out), "--variant", "fp16", "--batch", "1",
                 "--resolution", "32:64:64", "--verify", "--force"]) == 0
    assert "ok" in capsys.readouterr().out
    bundle = read_bundle(out)
    assert (bundle.tokenizer_dir / "tokenizer.json").is_file()
    assert bundle.profile == Profile((1, 1, 1), (32, 64, 64), (32, 64, 64)) and (out / MANIFEST_NAME).is_file()
    assert not any(out.glob("unet_*_d1*"))  # the old bundle's files went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "input.png"]  # no staging folder left
    kwargs = dict(steps=4, seed=5, resolution=None, output_type="np")
    torch_edit = EditPipeline.from_pretrained(saved_models["fp16"], variant="fp16", progress=False)
    ref = torch_edit.edit(image_file, "make it blue", **kwargs).images
    out_images = EditPipeline.from_pretrained(out, progress=False).edit(image_file, "make it blue", **kwargs).images
    assert 10 * np.log10(1 / np.mean((ref - out_images) ** 2)) >= 40


def test_a_students_scales_are_verified_within_the_ranges_it_was_trained_over():
    from engine.specs import UNET_GUIDED
    from export.verify import random_inputs

    sizes = {"N": 300, "H": 2, "W": 2, "D": 4}
    scales = random_inputs(UNET_GUIDED, sizes, 10, seed=0, guidance=((2.0, 12.0), (1.0, 3.0)))["guidance"]
    assert scales.shape == (300, 2) and scales.dtype == np.float32
    assert 2.0 <= scales[:, 0].min() and scales[:, 0].max() <= 12.0 and scales[:, 0].max() > 9.0
    assert 1.0 <= scales[:, 1].min() and scales[:, 1].max() <= 3.0
