"""Graph plumbing shared by plugins, so a transform can read like its formula.

A plugin builds the replacement for a node with a `Chain` (named after that node, e.g.
`conv3/tucker/core`), returns it, and the engine splices it in with `replace_with_chain`
(or drops it with `detach` when the latency guard says no).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant input, or None when it is computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def sole_reader(graph: gs.Graph, node: gs.Node) -> gs.Node | None:
    """The one node that reads the node's (first) output, or None: other readers, or the output
    is also a graph output."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or any(t is out for t in graph.outputs):
        return None
    return out.outputs[0]


def clip_after(graph: gs.Graph, node: gs.Node):
    """The Relu or Clip with constant bounds that alone reads the node's output, as a
    surgeon.clipped_fit.Clip, or None (other readers, a graph output, another op)."""
    from surgeon.clipped_fit import Clip

    act = sole_reader(graph, node)
    if act is None:
        return None
    if act.op == "Relu":
        return Clip(0.0, float("inf"), "Relu")
    if act.op != "Clip":
        return None
    bounds = []
    # opset >= 11: optional inputs min, max; before: attributes of the same names
    for index, name, default in ((1, "min", float("-inf")), (2, "max", float("inf"))):
        t = input_or_none(act, index)
        if t is None:
            bounds.append(float(act.attrs.get(name, default)))
            continue
        value = constant_value(t)
        if value is None or value.size != 1:
            return None  # a bound computed at run time
        bounds.append(float(value.reshape(())))
    return Clip(*bounds) if bounds[0] < bounds[1] else None


def add_partner(graph: gs.Graph, node: gs.Node) -> gs.Tensor | None:
    """The other input of the Add that alone reads the node's output (a residual connection:
    y + s), or None (other readers, a graph output, another op, an Add of the output with
    itself). Whether the two have the same shape is checked on the data (layer_stats.collect)."""
    add = sole_reader(graph, node)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None
    other = [t for t in add.inputs if t is not node.outputs[0]]
    return other[0] if len(other) == 1 and not isinstance(other[0], gs.Constant) else None


def _channel_constant_after(graph: gs.Graph, node: gs.Node, op: str,
                            input_rank: int | None) -> tuple[gs.Node, np.ndarray] | None:
    """The `op` node (Add, Mul) that alone reads a layer's output and applies a constant per
    output channel, with that constant as a length-C vector; None otherwise. The layer is a Conv,
    or a MatMul with a constant (in, C) weight whose input has `input_rank` 2. The constant,
    right-aligned against the output ((N, C, *spatial), (N, C)), may vary along C only (a scalar
    or size-1 axis broadcasts)."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return None
    if node.op == "Conv":  # (ConvTranspose's weight is (C, F/g, k): not this)
        channels, rank = weight.shape[0], weight.ndim
    elif node.op == "MatMul" and input_rank == 2 and weight.ndim == 2:
        channels, rank = weight.shape[1], 2
    else:
        return None
    reader = sole_reader(graph, node)
    if reader is None or reader.op != op or len(reader.inputs) != 2 or len(reader.outputs) != 1:
        return None
    other = [t for t in reader.inputs if t is not node.outputs[0]]
    value = constant_value(other[0]) if len(other) == 1 else None
    if value is None or not np.issubdtype(value.dtype, np.floating) or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return reader, np.broadcast_to(value.reshape(-1), (channels,)).astype(weight.dtype)


def bias_add_after(graph: gs.Graph, node: gs.Node, input_rank: int | None = None) -> tuple[gs.Node, np.ndarray] | None:
    """The Add of a constant per output channel after a layer (a bias an exporter left outside
    it: paddle2onnx and some TensorFlow converters for a Conv, tf2onnx's Dense and a Linear
    exported as MatMul + Add for a 2-D MatMul), as (Add, length-C bias); None otherwise."""
    return _channel_constant_after(graph, node, "Add", input_rank)


def scale_mul_after(graph: gs.Graph, node: gs.Node, input_rank: int | None = None) -> tuple[gs.Node, np.ndarray] | None:
    """The Mul by a constant per output channel after a layer (a batch norm's scale exported on
    its own: torchvision's FrozenBatchNorm2d is x * a + c), as (Mul, length-C scale); None
    otherwise."""
    return _channel_constant_after(graph, node, "Mul", input_rank)


def _take_output(node: gs.Node, absorbed: gs.Node) -> str:
    """The layer writes the absorbed node's output tensor, so readers and names downstream stay
    as they were; the absorbed node, now unconnected, is dropped by the export's cleanup."""
    out = absorbed.outputs[0]
    absorbed.inputs.clear()
    absorbed.outputs.clear()
    node.outputs[0] = out
    return absorbed.name


def fold_bias_add(graph: gs.Graph, node: gs.Node, tag: str, input_rank: int | None = None) -> str | None:
    """Fold the per-channel Add after a layer (`bias_add_after`) into it, exactly: a Conv's
    bias b becomes b + c; a 2-D MatMul becomes Gemm(x, W, c) (what onnxruntime fuses it into
    on load). Returns the folded Add's name, or None."""
    found = bias_add_after(graph, node, input_rank)
    if found is None:
        return None
    add, extra = found
    bias = input_or_none(node, 2) if node.op == "Conv" else None
    old = np.zeros_like(extra) if bias is None else constant_value(bias)
    if old is None:
        return None  # a bias computed at run time
    if node.op == "MatMul":
        node.op = "Gemm"  # alpha = beta = 1, no transposes: x W + c
    replace_constant(graph, node, 2, tag, "bias", (old.astype(np.float64) + extra).astype(extra.dtype))
    return _take_output(node, add)


def fold_scale_mul(graph: gs.Graph, node: gs.Node, tag: str, input_rank: int | None = None) -> str | None:
    """Fold the per-channel Mul after a layer (`scale_mul_after`) into it, exactly: (W x + b) * s
    is the layer W'[f] = s[f] W[f], b' = s b (onnxruntime fuses a Conv's Mul on load the same
    way). Returns the folded Mul's name, or None."""
    found = scale_mul_after(graph, node, input_rank)
    if found is None:
        return None
    mul, s = found
    bias = input_or_none(node, 2)
    b = None if bias is None else constant_value(bias)
    if bias is not None and b is None:
        return None  # a bias computed at run time
    w = constant_value(node.inputs[1]).astype(np.float64)
    s64 = s.astype(np.float64)
    w = w * (s64 if node.op == "MatMul" else s64.reshape(-1, *([1] * (w.ndim - 1))))
    replace_constant(graph, node, 1, tag, "weight", w.astype(s.dtype))
    if b is not None:
        replace_constant(graph, node, 2, tag, "bias", (b.astype(np.float64) * s64).astype(s.dtype))
    return _take_output(node, mul)


def fold_batchnorm_after(graph: gs.Graph, node: gs.Node, tag: str) -> str | None:
    """Fold the inference-mode BatchNormalization that alone reads a constant-weight Conv into
    it, exactly: y = a * (W * x + b - mean) + beta with a = gamma / sqrt(var + eps) is the conv
    W' = a[f] * W[f], b' = a * (b - mean) + beta (a conv without bias gets one). The conv then
    writes the BN's output tensor. Returns the folded BN's name, or None."""
    bn = sole_reader(graph, node)
    if node.op != "Conv" or bn is None or bn.op != "BatchNormalization" or len(bn.outputs) != 1 \
            or bn.attrs.get("training_mode", 0):
        return None
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    params = [constant_value(t) for t in bn.inputs[1:5]]
    bias = input_or_none(node, 2)
    b = np.zeros(w.shape[0], np.float64) if w is not None and bias is None else constant_value(bias)
    if w is None or b is None or len(params) != 4 or any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    a = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    replace_constant(graph, node, 1, tag, "weight", (w * a.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype))
    replace_constant(graph, node, 2, tag, "bias", ((b - mean) * a + beta).astype(w.dtype))
    return _take_output(node, bn)


def fold_affine_after(graph: gs.Graph, node: gs.Node, tag: str, input_rank: int | None = None, *,
                      scales: bool = True) -> list[str]:
    """Fold into the layer, exactly and one after another, what an exporter left after it of its
    affine map: bias Adds, and with `scales` per-channel Muls and inference-mode
    BatchNormalizations (Conv -> BN, Conv -> Mul -> Add as FrozenBatchNorm2d exports, Conv ->
    Add -> BN). Returns the folded nodes' names, in order."""
    folds = [functools.partial(fold_bias_add, input_rank=input_rank)]
    if scales:
        folds += [functools.partial(fold_scale_mul, input_rank=input_rank), fold_batchnorm_after]
    folded = []
    while True:  # the first fold that applies, again on what the layer now feeds, until none does
        name = next((name for fold in folds if (name := fold(graph, node, tag)) is not None), None)
        if name is None:
            return folded
        folded.append(name)


def not_constant(tensor: gs.Tensor | None, what: str = "weight") -> str:
    """Why a layer whose `what` is not a constant is skipped. A weight a DequantizeLinear
    computes belongs to a model that is already quantized: say so, and what to do instead."""
    producer = tensor.inputs[0] if tensor is not None and tensor.inputs else None
    if producer is not None and producer.op == "DequantizeLinear":
        return (f"{what} is dequantized at run time (the model is already quantized): rewrite the float model, "
                "then quantize")
    return f"{what} is not constant"


def input_or_none(node: gs.Node, index: int) -> gs.Tensor | None:
    """ONNX marks an omitted optional input with an empty name (graphsurgeon: an empty Variable)."""
    if index < len(node.inputs) and node.inputs[index].name != "":
        return node.inputs[index]
    return None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def shared_by(tensor: gs.Tensor, node: gs.Node) -> list[gs.Node]:
    """Other nodes that read the same tensor (a shared weight)."""
    return [n for n in tensor.outputs if n is not node]


class Chain:
    """Builds a chain of nodes that will replace `node`; names are `<node>/<tag>/<suffix>`."""

    def __init__(self, graph: gs.Graph, node: gs.Node, tag: str) -> None:
        self.graph = graph
        self.node = node
        self.prefix = f"{node.name}/{tag}"
        self.nodes: list[gs.Node] = []
        self._names = _name_set(graph)

    def _unique(self, name: str) -> str:
        if name not in self._names:
            self._names.add(name)
            return name
        k = 1
        while f"{name}_{k}" in self._names:
            k += 1
        self._names.add(f"{name}_{k}")
        return f"{name}_{k}"

    def const(self, suffix: str, array: np.ndarray, dtype: np.dtype | None = None) -> gs.Constant:
        values = np.ascontiguousarray(array, dtype=dtype or np.asarray(array).dtype)
        return gs.Constant(self._unique(f"{self.prefix}/{suffix}"), values)

    def op(self, op: str, suffix: str, inputs: Sequence[gs.Tensor], attrs: dict[str, Any] | None = None,
           dtype: Any = None) -> gs.Variable:
        """Append `op(inputs)`; returns its (single) output tensor."""
        name = self._unique(f"{self.prefix}/{suffix}")
        out = gs.Variable(self._unique(f"{name}:0"), dtype=dtype)
        node = gs.Node(op=op, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=[out])
        self.nodes.append(node)
        return out


def _name_set(graph: gs.Graph) -> set[str]:
    """Every node and tensor name in the graph, cached on it and kept current by Chain."""
    names = graph.__dict__.get("_surgeon_names")
    if names is None:
        names = {n.name for n in graph.nodes}
        names.update(graph.tensors().keys())
        graph._surgeon_names = names
    return names


def replace_with_chain(graph: gs.Graph, node: gs.Node, chain: Sequence[gs.Node]) -> None:
    """Splice `chain` in place of `node`: the chain's last node takes over the node's output
    tensor, so names, shapes and downstream consumers stay as they were."""
    if len(node.outputs) != 1 or len(chain[-1].outputs) != 1:
        raise ValueError(f"{node.name}: only single-output nodes can be replaced by a chain")
    out = node.outputs[0]
    placeholder = chain[-1].outputs[0]
    chain[-1].outputs.clear()
    node.outputs.clear()
    node.inputs.clear()
    chain[-1].outputs.append(out)
    out.dtype = out.dtype or placeholder.dtype
    index = graph.nodes.index(node)
    graph.nodes[index:index + 1] = list(chain)


def detach(chain: Sequence[gs.Node]) -> None:
    """Forget a chain that was built but will not be used (its nodes are registered as
    consumers of graph tensors as soon as they are created)."""
    for n in chain:
        n.inputs.clear()
        n.outputs.clear()


def spatial_attrs(node: gs.Node) -> dict[str, Any]:
    """The attributes that place a conv's window: kept on the core conv of a factorization."""
    keep = ("auto_pad", "pads", "strides", "dilations", "kernel_shape")
    return {k: v for k, v in node.attrs.items() if k in keep}


def pointwise_weight(matrix: np.ndarray, spatial_rank: int) -> np.ndarray:
    """A (out, in) matrix as the weight of a 1x1 (or 1, 1x1x1) conv with `spatial_rank` dims."""
    return matrix.reshape(matrix.shape + (1,) * spatial_rank)


def unique_name(graph: gs.Graph, name: str) -> str:
    """`name`, or `name_1`, `name_2`, ...: the first one no node or tensor of `graph` uses yet
    (reserved at once, in the same cached name set `Chain` keeps current)."""
    names = _name_set(graph)
    out, k = name, 1
    while out in names:
        out = f"{name}_{k}"
        k += 1
    names.add(out)
    return out


def replace_constant(graph: gs.Graph, node: gs.Node, index: int, tag: str, suffix: str,
                     value: np.ndarray) -> gs.Constant:
    """Point input `index` of `node` at the constant `value`, named `<node>/<tag>/<suffix>`
    (an omitted optional input in between stays omitted). A constant this node alone reads
    under that name already (an earlier edit by the same pass) takes the new value in place;
    any other old constant is left to the export's cleanup, which drops it once unused."""
    value = np.ascontiguousarray(value)
    name = f"{node.name}/{tag}/{suffix}"
    old = input_or_none(node, index)
    if isinstance(old, gs.Constant) and old.name == name and not shared_by(old, node):
        old.values = value
        return old
    const = gs.Constant(unique_name(graph, name), value)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = const
    return const


def cast_at_boundary(graph: gs.Graph, tensor: gs.Variable, inner_dtype: Any, name: str) -> gs.Node:
    """Let the graph compute in `inner_dtype` behind a graph input or output `tensor`, which keeps
    its own type: input -> Cast(to=inner) -> every former reader; former producer -> Cast(to the
    tensor's type) -> output. Returns the Cast (named `name`, made unique)."""
    inner = gs.Variable(unique_name(graph, f"{name}:0"), dtype=inner_dtype, shape=tensor.shape)
    if tensor in graph.inputs:
        for reader in list(tensor.outputs):
            for k, x in enumerate(list(reader.inputs)):
                if x is tensor:
                    reader.inputs[k] = inner
        cast = gs.Node("Cast", unique_name(graph, name), attrs={"to": _onnx_type(inner_dtype)},
                       inputs=[tensor], outputs=[inner])
        graph.nodes.insert(0, cast)
        return cast
    if tensor not in graph.outputs:
        raise ValueError(f"{tensor.name} is neither a graph input nor a graph output")
    for producer in list(tensor.inputs):
        for k, x in enumerate(list(producer.outputs)):
            if x is tensor:
                producer.outputs[k] = inner
    cast = gs.Node("Cast", unique_name(graph, name), attrs={"to": _onnx_type(tensor.dtype)},
                   inputs=[inner], outputs=[tensor])
    graph.nodes.append(cast)
    return cast


def _onnx_type(dtype: Any) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
