"""Make a float graph quantizable by onnxruntime.quantization before it sees it.

onnxruntime's quantizer assumes the common forms and fails with internal messages on the rest.
Each rewrite here is exact (the float function is unchanged); what cannot be made quantizable is
kept in float with a reason, so the user never sees onnxruntime's raw exception text.

* Gemm's C: onnxruntime quantizes C as a per-channel int32 bias and needs it 1-D of length N.
  Gemm computes alpha * A' B' + beta * C with C unidirectionally broadcast to (M, N) (ONNX Gemm
  spec), so a scalar, (N,), (1, N) or (1, 1) C is the 1-D bias beta * C broadcast to (N,); any
  other C ((M, N), (M, 1)) becomes Gemm(A, B) followed by Add(Y, beta * C).
* ConvTranspose with group > 1: onnxruntime's per-channel weight scales for ConvTranspose assume
  one group (axis 1 of (C, F/g, k, k) is not the output channel), so the node stays in float.
* A weight computed at run time (a graph input or an activation) on Conv/ConvTranspose/Gemm
  stays in float: there is no constant to quantize ahead of time.
* A Softmax whose probabilities the model returns (directly or through reshapes) stays in float:
  onnxruntime fixes a Softmax output's range to [0, 1], steps of 1/255 in uint8, which rounds
  every probability under 1/510 to zero. The zoo's Inception-v2 (seeded weights, a flat
  1000-class distribution) came out all zeros: drift 1.0000, 0% agreement; 0.0006 and 100%
  with its Softmax in float. (A Softmax inside the graph, attention's, keeps onnxruntime's way.)
* float16 models: onnxruntime quantizes float32 graphs only. Every float16 initializer is cast to
  float32 (exact), as is every float16 tensor attribute (ConstantOfShape's value),
  Cast(to=float16) inside the graph becomes Cast(to=float32), and float16 graph
  inputs/outputs keep their type through a Cast at the boundary, so the quantized model takes and
  returns what the original did. The int8 arithmetic is what it would be on the float32 model.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.errors import UsageError
from surgeon.model import to_graph, to_model
from surgeon.rewrite import cast_at_boundary, constant_value, input_or_none, replace_constant, unique_name

log = logging.getLogger(__name__)

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Prepared:
    model: onnx.ModelProto
    keep_float: dict[str, str] = field(default_factory=dict)  # node name -> why it stays in float
    notes: dict[str, list[str]] = field(default_factory=dict)  # what was rewritten, by kind
    float16: bool = False


# onnxruntime's own fused nodes, from its extended graph optimizations (a model saved through
# SessionOptions.optimized_model_filepath). Its quantizer knows no type for their outputs
# ("Unable to get valid quantization scale for input '/_blocks.0/Clip_output_0'") and leaves them
# float: EfficientNet-Lite0 saved that way (33 FusedConv), with the types filled in, quantized 27
# of its 60 layers and ran at 0.83x the original's speed (7 Dec 2026).
ORT_FUSED = ("FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv", "NhwcFusedConv")


# A model holding these is quantized already: onnxruntime's quantizer fails on it with "two nodes
# with same node name (..._DequantizeLinear)" (EfficientNet-Lite0's int8 output, 7 Dec 2026).
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm", "QLinearAdd", "QLinearMul")


def prepare_for_ort(model: onnx.ModelProto) -> Prepared:
    """Exact rewrites so onnxruntime's quantizer accepts every node it is given."""
    fused = Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in ORT_FUSED)
    if fused:
        raise UsageError(f"int8: the model holds onnxruntime's own fused nodes "
                         f"({', '.join(f'{op} x{k}' for op, k in sorted(fused.items()))}), as onnxruntime saves a "
                         "model after its extended graph optimizations; its quantizer leaves them in float, "
                         "so quantize the model as it was exported (or as saved at optimization level basic)")
    quantized = Counter(n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS)
    if quantized:
        raise UsageError(f"int8: the model is already quantized "
                         f"({', '.join(f'{op} x{k}' for op, k in sorted(quantized.items()))}); quantize the float "
                         "model it came from")
    graph = to_graph(model)
    res = Prepared(model)
    res.float16 = _float16_to_float32(graph, res)
    for node in list(graph.nodes):
        if node.op == "Gemm":
            _gemm_bias_1d(graph, node, res)
        elif node.op == "ConvTranspose" and node.attrs.get("group", 1) != 1:
            res.keep_float[node.name] = (f"grouped ConvTranspose (group={node.attrs['group']}): onnxruntime's "
                                         "per-channel weight quantization supports group=1 only")
        elif node.op == "Softmax" and _returned(graph, node.outputs[0]):
            res.keep_float[node.name] = ("the model's output probabilities: onnxruntime quantizes a Softmax output "
                                         "to [0, 1] in steps of 1/255, which rounds every probability under 0.002 "
                                         "to zero")
        if node.op in WEIGHTED:
            _own_weight(graph, node, res)
        if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 1:
            w = node.inputs[1]
            if constant_value(w) is None:
                where = "a graph input" if w in graph.inputs else "computed at run time"
                res.keep_float[node.name] = f"weight '{w.name}' is {where}, not a constant: nothing to quantize ahead"
    res.model = to_model(graph, like=model)
    return res


# ops that only move values: a Softmax's probabilities through them are still what the model returns
MOVES_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _float_cast(node: gs.Node) -> bool:
    """A Cast to another float type moves values too: a float16 model's output Softmax reaches the
    output through the boundary Cast back to float16, and was quantized to steps of 1/255."""
    return node.op == "Cast" and node.attrs.get("to") in FLOAT_TYPES


def _returned(graph: gs.Graph, t: gs.Tensor) -> bool:
    """Whether `t` is a graph output, or reaches one through value-moving ops alone."""
    outputs = {o.name for o in graph.outputs}
    while t.name not in outputs:
        if len(t.outputs) != 1 or not (t.outputs[0].op in MOVES_ONLY or _float_cast(t.outputs[0])):
            return False
        t = t.outputs[0].outputs[0]
    return True


def _gemm_bias_1d(graph: gs.Graph, node: gs.Node, res: Prepared) -> None:
    c_t = input_or_none(node, 2)
    if c_t is None:
        return
    c = constant_value(c_t)
    beta = float(node.attrs.get("beta", 1.0))
    n_out = _gemm_n(node)
    if c is not None and n_out is not None and c.size in (1, n_out) and (c.ndim < 2 or c.shape[0] == 1) \
            and (c.ndim == 0 or c.shape[-1] in (1, n_out)):
        if c.ndim == 1 and beta == 1.0 and c.shape[0] == n_out:
            return  # already the form onnxruntime expects
        bias = np.broadcast_to(np.asarray(c, np.float64).reshape(-1) * beta, (n_out,)).astype(c.dtype)
        replace_constant(graph, node, 2, "int8", "bias", bias)
        node.attrs["beta"] = 1.0
        res.notes.setdefault("gemm_bias_1d", []).append(node.name)
        return
    # C varies along M (or is computed): Gemm without C, then Add(Y, beta * C)
    y = node.outputs[0]
    mid = gs.Variable(unique_name(graph, f"{node.name}/int8/ab"), dtype=y.dtype)
    if c is not None:
        c_in = gs.Constant(unique_name(graph, f"{node.name}/int8/c"), np.ascontiguousarray((c * beta).astype(c.dtype)))
    elif beta == 1.0:
        c_in = c_t
    else:
        beta_c = gs.Constant(unique_name(graph, f"{node.name}/int8/beta"), np.asarray(beta, dtype=np.float32))
        c_in = gs.Variable(unique_name(graph, f"{node.name}/int8/beta_c"), dtype=c_t.dtype)
        graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{node.name}/int8/scale_c"), inputs=[c_t, beta_c],
                                   outputs=[c_in]))
    node.inputs.pop(2)
    node.attrs.pop("beta", None)
    node.outputs[0] = mid
    graph.nodes.append(gs.Node("Add", unique_name(graph, f"{node.name}/int8/add_c"), inputs=[mid, c_in], outputs=[y]))
    res.notes.setdefault("gemm_bias_as_add", []).append(node.name)


def _own_weight(graph: gs.Graph, node: gs.Node, res: Prepared) -> None:
    """A constant weight that other nodes also read gets a private copy for this node: onnxruntime
    would otherwise hand its dequantized (rounded) values to every reader, and one set of
    per-channel scales would have to serve two layers."""
    for k, t in enumerate(list(node.inputs[:2])):
        value = constant_value(t)
        if value is None or value.ndim < 2 or len({id(n) for n in t.outputs}) < 2:
            continue
        replace_constant(graph, node, k, "int8", "weight", np.array(value))  # the old one stays with the others
        res.notes.setdefault("private_weight_copy", []).append(node.name)


def _gemm_n(node: gs.Node) -> int | None:
    """N of Gemm's (M, N) output, from the constant B when there is one."""
    b = constant_value(node.inputs[1])
    if b is None or b.ndim != 2:
        return None
    return int(b.shape[0] if node.attrs.get("transB", 0) else b.shape[1])


def _float16_to_float32(graph: gs.Graph, res: Prepared) -> bool:
    f16 = np.dtype(np.float16)
    touched = False
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and np.asarray(t.values).dtype == f16:
            t.values = np.asarray(t.values).astype(np.float32)
            touched = True
        elif isinstance(t, gs.Variable) and t.dtype is not None and np.dtype(t.dtype) == f16 \
                and t not in graph.inputs and t not in graph.outputs:
            t.dtype = np.float32
            touched = True
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT16:
            node.attrs["to"] = onnx.TensorProto.FLOAT
            touched = True
        for value in node.attrs.values():
            # a tensor attribute sets its output's type: ConstantOfShape's value (the OCR
            # recognizer's LSTM initial states) kept float16 outputs in a float32 graph, and
            # onnxruntime refused the model
            if isinstance(value, gs.Constant) and np.asarray(value.values).dtype == f16:
                value.values = np.asarray(value.values).astype(np.float32)
                touched = True
    for t in [t for t in list(graph.inputs) + list(graph.outputs) if t.dtype is not None and np.dtype(t.dtype) == f16]:
        # the boundary keeps float16: the model still takes and returns what it did
        to = "to_float32" if t in graph.inputs else "to_float16"
        cast_at_boundary(graph, t, np.float32, f"{t.name}/int8/{to}")
        touched = True
    if touched:
        res.notes["float16"] = ["float16 weights and activations computed in float32 for quantization; "
                                "float16 inputs/outputs kept through Cast at the graph boundary"]
    return touched

