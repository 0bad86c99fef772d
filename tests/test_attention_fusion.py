"""Attention rewritten for onnxruntime's blocked kernel: the same pictures, and the score matrix never whole."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine import EditPipeline
from engine.backends.attention_fusion import find_chains, fuse_attention
from engine.manifest import MANIFEST_NAME, sha256_file


def psnr(a, b) -> float:
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


def softmax_count(path) -> int:
    return sum(n.op_type == "Softmax" for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("precision, floor", [("fp32", 80.0), ("fp16", 45.0)])
def test_every_attention_of_a_bundle_is_fused_and_the_pictures_stay(onnx_bundles, tiny_pipe, rgb_image, precision,
                                                                    floor):
    """float32 pictures equal; float16 ones differ as float16 rounds (the fused op computes in float32), and
    come no further from torch's float32 pictures than the graphs as exported."""
    folder = Path(onnx_bundles[precision])
    fused = EditPipeline.from_pretrained(folder, backend="onnxruntime", progress=False)
    plain = EditPipeline.from_pretrained(folder, backend="onnxruntime", progress=False,
                                         backend_options={"fused_attention": False})
    # every Softmax of every graph was an attention, but the text encoder's (77 tokens, under a causal mask: kept)
    chains = {name: softmax_count(folder / f"{name}.onnx") for name in fused.backend.fused if name != "text_encoder"}
    assert chains["unet"] > 0 and fused.backend.fused == chains | {"text_encoder": 0}
    assert plain.backend.fused == {}
    kwargs = dict(steps=3, seed=5, resolution=None, output_type="np")
    out, ref = (pipe.edit(rgb_image, "make it blue", **kwargs).images for pipe in (fused, plain))
    torch_ref = tiny_pipe.edit(rgb_image, "make it blue", **kwargs).images
    assert psnr(out, ref) >= floor and psnr(out, torch_ref) >= psnr(ref, torch_ref) - 0.5


def test_a_graph_with_its_weights_in_a_side_file_is_fused_and_reads_them(onnx_bundles, rgb_image, tmp_path):
    """sd15's UNet keeps its 3.4 GB of weights beside the graph: the fused graph goes to onnxruntime from memory
    and its weights are found in the bundle's folder."""
    folder = Path(shutil.copytree(onnx_bundles["fp32"], tmp_path / "bundle"))
    graph = onnx.load(str(folder / "unet.onnx"))
    onnx.save_model(graph, str(folder / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["components"]["unet"]["files"] = [
        {"path": name, "sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in ("unet.onnx", "unet.onnx.data")]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert (folder / "unet.onnx").stat().st_size < (folder / "unet.onnx.data").stat().st_size

    side = EditPipeline.from_pretrained(folder, backend="onnxruntime", progress=False)
    inline = EditPipeline.from_pretrained(onnx_bundles["fp32"], backend="onnxruntime", progress=False)
    assert side.backend.fused["unet"] == inline.backend.fused["unet"] > 0
    kwargs = dict(steps=2, seed=3, resolution=None, output_type="np")
    np.testing.assert_allclose(side.edit(rgb_image, "x", **kwargs).images, inline.edit(rgb_image, "x", **kwargs).images,
                               atol=1e-6)


ATTENTION_RUN = textwrap.dedent("""
    import resource, sys
    import numpy as np, onnx, onnxruntime as ort
    from engine.backends.attention_fusion import fuse_attention

    model = onnx.load(sys.argv[1])
    fused = fuse_attention(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = int(sys.argv[2])
    inputs = {i.name: np.random.default_rng(0).standard_normal((1, 2, tokens, 8)).astype(np.float32)
              for i in session.get_inputs()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = session.run(None, inputs)[0]
    print(fused, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, out.shape)
""")


@pytest.fixture(scope="module")
def attention_graph(tmp_path_factory) -> Path:
    """torch's exporter's own attention chain (scaled_dot_product_attention over 2 heads of 8), any token count."""
    import torch
    from torch.export import Dim

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    path = tmp_path_factory.mktemp("attention") / "attention.onnx"
    tokens = Dim("tokens", min=2, max=1 << 16)
    example = tuple(torch.randn(1, 2, 64, 8) for _ in range(3))
    program = torch.onnx.export(Attention(), example, dynamo=True, input_names=["q", "k", "v"], opset_version=18,
                                dynamic_shapes={name: {2: tokens} for name in "qkv"}, verbose=False)
    program.save(str(path))
    return path


def test_fused_attention_equals_the_exported_chain(attention_graph):
    import onnxruntime as ort

    model = onnx.load(str(attention_graph))
    assert len(find_chains(model)) == 1
    rng = np.random.default_rng(1)
    inputs = {name: rng.standard_normal((1, 2, 300, 8)).astype(np.float32) for name in "qkv"}
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    assert fuse_attention(model) == 1 and not find_chains(model)
    assert {n.op_type for n in model.graph.node} >= {"MultiHeadAttention"} and "Softmax" not in {
        n.op_type for n in model.graph.node}
    fused = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    np.testing.assert_allclose(fused, plain, atol=1e-5)


def test_fused_attention_never_holds_the_score_matrix(attention_graph):
    """32,768 tokens over 2 heads: the scores whole are 8 GiB in float32; the fused kernel grows the process by
    a small fraction of that."""
    tokens = 1 << 15
    scores = 2 * tokens * tokens * 4
    run = subprocess.run([sys.executable, "-c", ATTENTION_RUN, str(attention_graph), str(tokens)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    fused, growth, shape = run.stdout.split(maxsplit=2)
    assert int(fused) == 1 and shape.strip() == f"(1, 2, {tokens}, 8)"
    assert int(growth) < scores / 32, f"grew {int(growth) / 2**20:.0f} MiB"


def test_a_softmax_that_is_no_attention_is_left_as_it_is():
    """Scores that multiply from the right, or over 3-d tensors, are not the exporter's attention."""
    from onnx import TensorProto, helper

    def graph(second: list[str], dims: list) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                 helper.make_node("MatMul", second, ["o"])]
        tensors = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in "qkv"]
        out = helper.make_tensor_value_info("o", TensorProto.FLOAT, dims)
        return helper.make_model(helper.make_graph(nodes, "g", tensors, [out]),
                                 opset_imports=[helper.make_opsetid("", 18)])

    assert len(find_chains(graph(["p", "v"], [1, 2, 4, 4]))) == 1
    assert find_chains(graph(["v", "p"], [1, 2, 4, 4])) == []
    assert find_chains(graph(["p", "v"], [2, 4, 4])) == []
    model = graph(["v", "p"], [1, 2, 4, 4])
    assert fuse_attention(model) == 0 and [n.op_type for n in model.graph.node] == ["MatMul", "Softmax", "MatMul"]
