"""Attention in onnxruntime without the whole score matrix: exported graphs rewritten for its fused kernel.

torch's exporter writes each scaled-dot-product attention as MatMul -> Softmax -> MatMul over
(batch, heads, tokens, head_size) tensors: the standard ONNX that OpenVINO fuses into its own blocked
attention and TensorRT into its fused kernels. onnxruntime runs that chain as written and holds the
(batch, heads, tokens, tokens) scores: 137 GB for SD 1.5's finest level at 2048x2048. Its CPU and CUDA
providers have a blocked (flash) kernel only in their own ``com.microsoft.MultiHeadAttention``, so the
onnxruntime backend swaps each chain for that op when it loads a graph; the bundle's files stay standard.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Chain:
    """One attention chain found in a graph: its (B, N, S, H) query, (B, N, H, L) transposed key and
    (B, N, L, H) value, the product of the scalar factors on query and key, and the nodes it replaces."""

    query: str
    key_t: str
    value: str
    scale: float
    heads: int
    output: str
    nodes: tuple[int, ...]
    half: bool  # float16 tensors around a float32 Softmax: the fused op runs in float32 between two Casts


class _Graph:
    """Producers, consumers and constant values of one graph, looked up by tensor name."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                self.consumers.setdefault(name, []).append(i)
        self.outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        self.shapes = {v.name: v.type.tensor_type.shape for v in (*graph.input, *graph.value_info, *graph.output)}

    def node(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        return None if index is None else self.graph.node[index]

    def only_consumer(self, name: str) -> int | None:
        """The one node reading ``name``, where exactly one does and it is no graph output."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def scalar(self, name: str) -> float | None:
        """The value of a one-element constant (initializer or Constant node), else None."""
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        else:
            node = self.node(name)
            if node is None or node.op_type != "Constant" or not node.attribute or node.attribute[0].name != "value":
                return None
            value = numpy_helper.to_array(node.attribute[0].t)
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape.dim)

    def static_dim(self, name: str, axis: int) -> int | None:
        shape = self.shapes.get(name)
        if shape is None or len(shape.dim) <= axis or not shape.dim[axis].HasField("dim_value"):
            return None
        return shape.dim[axis].dim_value


def _unscaled(graph: _Graph, name: str, nodes: list[int]) -> tuple[str, float]:
    """``name`` less a Mul by a scalar constant feeding only it (torch's exporter scales query and key each by
    sqrt(scale)): the tensor before it, and the factor."""
    node = graph.node(name)
    if node is None or node.op_type != "Mul" or graph.only_consumer(name) is None:
        return name, 1.0
    for i, j in ((0, 1), (1, 0)):
        factor = graph.scalar(node.input[j])
        if factor is not None:
            nodes.append(graph.producer[name])
            return node.input[i], factor
    return name, 1.0


def _past_cast(graph: _Graph, index: int) -> int | None:
    """The node after ``index`` (its only consumer), stepping over one Cast (float16 graphs keep Softmax in
    float32 between two)."""
    follower = graph.only_consumer(graph.graph.node[index].output[0])
    if follower is not None and graph.graph.node[follower].op_type == "Cast":
        return graph.only_consumer(graph.graph.node[follower].output[0])
    return follower


def read_graph(path) -> onnx.ModelProto:
    """The graph of ``path`` without its weights' side file (left on disk for onnxruntime to read)."""
    return onnx.load(str(path), load_external_data=False)


def find_chains(model: onnx.ModelProto) -> list[Chain]:
    """Every MatMul -> [Cast] -> Softmax(last axis) -> [Cast] -> MatMul chain over 4-d tensors whose head count
    the graph's shapes state."""
    graph = _Graph(model.graph)
    chains = []
    for index, softmax in enumerate(model.graph.node):
        if softmax.op_type != "Softmax" or any(a.name == "axis" and a.i not in (-1, 3) for a in softmax.attribute):
            continue
        before = graph.node(softmax.input[0])
        half = before is not None and before.op_type == "Cast" and graph.only_consumer(softmax.input[0]) is not None
        if half:
            before = graph.node(before.input[0])
        after = _past_cast(graph, index)
        if before is None or before.op_type != "MatMul" or after is None:
            continue
        product = model.graph.node[after]
        probabilities = graph.producer.get(product.input[0])  # the Softmax, or the Cast after it
        if product.op_type != "MatMul" or probabilities not in (index, graph.only_consumer(softmax.output[0])):
            continue
        nodes = [graph.producer[before.output[0]], index, after]
        nodes += [graph.producer[n] for n in (softmax.input[0], model.graph.node[after].input[0])
                  if graph.producer[n] not in nodes]
        if graph.only_consumer(before.output[0]) is None:
            continue
        query, query_factor = _unscaled(graph, before.input[0], nodes)
        key_t, key_factor = _unscaled(graph, before.input[1], nodes)
        heads = graph.static_dim(query, 1)
        if heads is None or any(graph.rank(name) != 4 for name in (query, key_t, product.input[1])):
            log.debug("attention at %s: head count unknown, left as it is", softmax.name)
            continue
        chains.append(Chain(query, key_t, product.input[1], query_factor * key_factor, heads, product.output[0],
                            tuple(sorted(set(nodes))), half))
    return chains


def fuse_attention(model: onnx.ModelProto, upcast: bool = True) -> int:
    """Replace every attention chain of ``model`` (in place) by onnxruntime's MultiHeadAttention on
    (B, S, N*H) tensors, reshaped from and back to the chain's own layout; returns how many were replaced.
    ``upcast``: float16 chains run the fused op in float32 (onnxruntime's blocked CPU kernel takes float32
    only; without it the CPU kernel holds the scores again), as their Softmax did."""
    if not model.graph.value_info:  # the head count is read from the graph's shapes
        model.graph.value_info.extend(onnx.shape_inference.infer_shapes(model).graph.value_info)
    chains = find_chains(model)
    if not chains:
        return 0
    graph = model.graph
    constants = {"flat": [0, 0, -1]} | {f"heads{c.heads}": [0, 0, c.heads, -1] for c in chains}
    for key, value in constants.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"attention_fusion_{key}"))
    drop = {i for chain in chains for i in chain.nodes}
    added: dict[int, list[onnx.NodeProto]] = {}  # at the chain's last node: its inputs are all made by then
    for n, chain in enumerate(chains):
        added[max(chain.nodes)] = _fused_nodes(chain, f"attention_fusion_{n}", upcast and chain.half)
    nodes, original = [], list(graph.node)
    for i, node in enumerate(original):
        nodes += added.get(i, [])
        if i not in drop:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    dropped_inputs = {name for i, node in enumerate(original) if i in drop for name in node.input}
    used = {name for node in nodes for name in node.input}  # the chains' scale factors went with them
    kept = [t for t in graph.initializer if t.name in used or t.name not in dropped_inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(chains)


def _fused_nodes(chain: Chain, prefix: str, upcast: bool) -> list[onnx.NodeProto]:
    """(B, N, S, H) query and value and (B, N, H, L) key to (B, S, N*H) (float16 to float32 with ``upcast``);
    MultiHeadAttention; back to (B, N, S, H) under the chain's output name. onnxruntime cancels the
    transposes that meet their inverse."""
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], tag: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{prefix}_{tag}"], name=f"{prefix}_{tag}", **attrs))
        return f"{prefix}_{tag}"

    def flat(name: str, perm: list[int], tag: str) -> str:
        flat = add("Reshape", [add("Transpose", [name], f"{tag}_t", perm=perm), "attention_fusion_flat"], tag)
        return add("Cast", [flat], f"{tag}_f", to=onnx.TensorProto.FLOAT) if upcast else flat

    inputs = [flat(chain.query, [0, 2, 1, 3], "q"), flat(chain.key_t, [0, 3, 1, 2], "k"),
              flat(chain.value, [0, 2, 1, 3], "v")]
    out = add("MultiHeadAttention", inputs, "mha", domain=MS_DOMAIN, num_heads=chain.heads, scale=chain.scale)
    if upcast:
        out = add("Cast", [out], "mha_h", to=onnx.TensorProto.FLOAT16)
    out = add("Reshape", [out, f"attention_fusion_heads{chain.heads}"], "o4")
    nodes.append(helper.make_node("Transpose", [out], [chain.output], perm=[0, 2, 1, 3], name=f"{prefix}_out"))
    return nodes
