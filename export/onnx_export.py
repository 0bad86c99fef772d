"""One network to one ONNX file with torch's dynamo exporter, and its float16 conversion."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch

from engine.specs import ComponentSpec, Range

log = logging.getLogger(__name__)

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a side file (protobuf caps a file at 2 GiB)
# Normalisations and softmax stay float32 in float16 graphs: their reductions overflow or lose precision.
FP32_OPS = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"]


def sample_inputs(spec: ComponentSpec, dims: dict[str, Range]) -> tuple[torch.Tensor, ...]:
    """Example inputs at the profile's opt shape; dynamic sizes of 1 become 2 (torch.export specialises 1)."""
    tensors = []
    for tensor in spec.inputs:
        shape = []
        for d in tensor.dims:
            if isinstance(d, int):
                shape.append(d)
            else:
                lo, opt, hi = dims[d]
                shape.append(opt if lo == hi or opt > 1 else min(2, hi))
        if tensor.dtype == "int64":
            tensors.append(torch.randint(0, 100, shape, dtype=torch.int64))
        elif tensor.name == "timestep":
            tensors.append(torch.full(shape, 500.0))
        elif tensor.name == "guidance":
            tensors.append(torch.full(shape, 2.0))
        else:
            tensors.append(torch.randn(shape))
    return tuple(tensors)


def dynamic_shapes(spec: ComponentSpec, dims: dict[str, Range], vae_factor: int) -> dict[str, dict]:
    """torch.export Dims for every symbolic axis whose range is not a single value; pixel axes are
    derived from latent axes (HP = vae_factor * H) so the exporter sees the divisibility, and latent axes
    from the step cache's deep feature where it is coarser (H = scale * FH)."""
    from torch.export import Dim

    made: dict[str, object] = {}
    scale = dims["H"][1] // dims["FH"][1] if "FH" in dims else 1  # latent side over the deep feature's

    def dim(symbol: str):
        if symbol in ("HP", "WP"):
            return vae_factor * dim(symbol[0])
        if symbol in ("FH", "FW") and scale == 1:
            return dim(symbol[1])
        if symbol in ("H", "W") and scale > 1:
            return scale * dim("F" + symbol)
        if symbol not in made:
            lo, _, hi = dims[symbol]
            made[symbol] = Dim(symbol, min=lo, max=hi)
        return made[symbol]

    shapes = {}
    for tensor in spec.inputs:
        axes = {}
        for axis, d in enumerate(tensor.dims):
            if isinstance(d, str) and dims[d][0] != dims[d][2]:
                axes[axis] = dim(d)
        shapes[tensor.name] = axes or None
    return shapes


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, dims: dict[str, Range], vae_factor: int, path: Path,
                external_over: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """Export ``module`` (float32) to ``path``; returns the files written (graph, and weights in
    ``<name>.data`` when they exceed ``external_over`` bytes)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > external_over
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            sample_inputs(spec, dims),
            dynamo=True,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_shapes=dynamic_shapes(spec, dims, vae_factor),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    make_reproducible(program.model)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    program.save(str(path), external_data=external)  # weights go to <name>.onnx.data when external
    return onnx_files(path)


CODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "namespace")  # per node


def make_reproducible(model) -> None:
    """Drop what torch's exporter records of the run rather than the graph, so that the same weights and
    tool versions give the same bytes: each node's stack trace (absolute paths and line numbers of the
    exporting code), its Python module scope (the exporting code's class paths, which a refactor moves) and
    the symbolic ranges (printed from a set, in an order that varies between runs)."""
    import onnx_ir

    model.graph.metadata_props.pop("pkg.torch.export.ExportedProgram.range_constraints", None)
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        for key in CODE_METADATA:
            node.metadata_props.pop(key, None)


def save_onnx(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Save with weights inline, or in ``<name>.data`` beside the graph."""
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if external:  # onnx.save_model checks the data file's name against the working directory; onnx_ir does not
        import onnx_ir

        onnx_ir.save(onnx_ir.from_proto(model), path, external_data=path.name + ".data")
    else:
        onnx.save_model(model, path)


def onnx_files(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def _embedding_nodes(model: onnx.ModelProto, inputs: tuple[str, ...]) -> list[str]:
    """Nodes between ``inputs`` (the timestep; a student's guidance scales) and the first matrix product: the
    sinusoidal embeddings, which float16 would quantise (t = 946.37 is 946.5 in float16; a scale times 1000
    likewise)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names, frontier = [], list(inputs)
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("MatMul", "Gemm") or node.name in names:
                continue
            names.append(node.name)
            frontier.extend(node.output)
    return names


def convert_to_fp16(src: Path, dst: Path, external_over: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """Float16 weights and compute, float32 inputs/outputs; normalisations, softmax and the timestep (and
    guidance) embeddings stay float32. Returns the files written."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(src, load_external_data=True)
    embedded = tuple(i.name for i in model.graph.input if i.name in ("timestep", "guidance"))
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=FP32_OPS,
        node_block_list=_embedding_nodes(model, embedded) or None,
        disable_shape_infer=True,
    )
    drop_repeated_nodes(converted.graph)
    weight_bytes = sum(len(t.raw_data) for t in converted.graph.initializer)
    save_onnx(converted, dst, external=weight_bytes > external_over)
    return onnx_files(dst)


def drop_repeated_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes identical to an earlier one (same name, inputs, outputs and attributes), and repeated
    value_info entries. onnxruntime's float16 converter before 1.32 adds one Cast back to float32 per use of
    a float16 tensor by a float32-only node, all with one name and one output, which ONNX Runtime refuses
    to load ("two nodes with same node name"). Returns the number of nodes removed."""
    seen: set[bytes] = set()
    nodes = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    removed = len(graph.node) - len(nodes)
    if removed:
        del graph.node[:]
        graph.node.extend(nodes)
        infos, names = [], set()
        for info in graph.value_info:
            if info.name not in names:
                names.add(info.name)
                infos.append(info)
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return removed
