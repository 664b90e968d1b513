"""Keep a node of a QDQ model really in float when onnxruntime loads it.

onnxruntime (1.2x, graph transformer `WeightBiasQuantization`, basic level, on by default)
quantizes the *float* weight of any Conv/ConvTranspose/Gemm whose activation input comes out of
a DequantizeLinear with a per-tensor scale: it inserts Q/DQ with ONE symmetric scale for the
whole weight tensor, s = max|W| / 127, and an int32 bias with scale s_x * s. So a node that
`quantize_static(nodes_to_exclude=...)` left in float runs with per-tensor int8 weights, which
is much worse than the per-channel weights it would have had if quantized. Measured on
EfficientNet-Lite0 with `/_blocks.0/_depthwise_conv/Conv` excluded (per-channel weight maxima
0.40..17.7, four channels all zero): held-out drift 0.446 with onnxruntime's default session,
0.109 with that transformer disabled, 0.128 with the node quantized.

The transformer only fires when the input DequantizeLinear has a scalar scale. A node kept in
float therefore reads its input through its own DequantizeLinear with the same scale and zero
point repeated per channel (axis 1): the same values, computed the same way, and onnxruntime
leaves the float weight alone. The extra DequantizeLinear replaces the shared one when the float
node was its only reader, so the graph does no more work than before.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.model import to_graph, to_model
from surgeon.rewrite import constant_value, input_or_none, unique_name

log = logging.getLogger(__name__)

GUARDED_OPS = ("Conv", "ConvTranspose", "Gemm")


def input_channels(node: gs.Node) -> int | None:
    """Channels of the activation input along the axis a per-channel DequantizeLinear would use
    (axis 1), read from the constant weight; None when that axis is not the channel axis."""
    w = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None
    if node.op == "Conv":
        return int(w.shape[1]) * int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose":
        return int(w.shape[0])
    if node.op == "Gemm" and not node.attrs.get("transA", 0) and w.ndim == 2:
        return int(w.shape[1] if node.attrs.get("transB", 0) else w.shape[0])
    return None


def keep_weights_float(model: onnx.ModelProto, names: Iterable[str] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the QDQ `model` in which onnxruntime cannot quantize the float weights of the
    nodes `names` (default: every node whose weight is still float) at load time; returns it and
    the nodes that were guarded (the model itself when there are none)."""
    wanted = None if names is None else set(names)
    graph = to_graph(model)
    guarded = []
    for node in graph.nodes:
        if (wanted is not None and node.name not in wanted) or node.op not in GUARDED_OPS or len(node.inputs) < 2:
            continue
        if not isinstance(node.inputs[1], gs.Constant):
            continue  # the weight comes out of a DequantizeLinear (quantized) or is computed
        x = node.inputs[0]
        dq = x.inputs[0] if x.inputs else None
        if dq is None or dq.op != "DequantizeLinear":
            continue
        scale, zp = constant_value(dq.inputs[1]), constant_value(input_or_none(dq, 2)) \
            if input_or_none(dq, 2) is not None else None
        if scale is None or scale.size != 1:
            continue  # already per channel: onnxruntime leaves it alone
        c = input_channels(node)
        if c is None:
            log.info("int8: cannot guard float node %s (input channel axis unknown)", node.name)
            continue
        name = unique_name(graph, f"{node.name}/int8/float_input")
        inputs = [dq.inputs[0], gs.Constant(unique_name(graph, f"{name}/scale"),
                                            np.full(c, scale.reshape(()), dtype=scale.dtype))]
        if zp is not None:
            inputs.append(gs.Constant(unique_name(graph, f"{name}/zero_point"), np.full(c, zp.reshape(()), dtype=zp.dtype)))
        out = gs.Variable(unique_name(graph, f"{name}:0"), dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", name, attrs={"axis": 1}, inputs=inputs, outputs=[out]))
        node.inputs[0] = out
        guarded.append(node.name)
    if not guarded:
        return model, []
    graph.cleanup().toposort()
    return to_model(graph, like=model), guarded



FLOAT_OUTPUT_OPS = ("Gemm",)  # onnxruntime runs DQ -> Gemm with no output Q as QGemm with a float output


def float_outputs(model: onnx.ModelProto, float_model: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the QDQ `model` whose graph outputs computed by a Gemm leave it in float: the
    QuantizeLinear -> DequantizeLinear pair between the Gemm and the output is dropped. Only
    outputs that a Gemm writes in `float_model` too (the model before quantization, when given):
    quantize_static removes a Relu/Clip after a Gemm and lets the Q range do the clipping, so
    that pair is the activation and must stay.

    Why: 8-bit logits take 256 values, so two classes often tie at the top (EfficientNet-Lite0,
    64 held-out photos: two of the four rows that disagreed with fp32 were ties), and the
    rounding adds drift for nothing; the pair saves no time, since onnxruntime's QGemm writes a
    float output directly (measured: latency ratio 0.994, interval 0.974-1.014, at batch 1).
    Returns the model and the outputs changed (the model itself when there are none)."""
    graph = to_graph(model)
    changed = []
    direct = None if float_model is None else {
        o for n in float_model.graph.node if n.op_type in FLOAT_OUTPUT_OPS for o in n.output}
    behind = {} if float_model is None else {n.output[0]: n.input[0] for n in float_model.graph.node if n.op_type == "Cast"}
    for out in list(graph.outputs):
        # A float16 model's output is written by the Cast back to float16 that int8_prepare puts
        # at the boundary: the pair sits before that Cast (EfficientNet-Lite0 in float16 kept
        # 92.2% of the answers with 8-bit logits, the float32 model 96.9% without)
        cast = out.inputs[0] if out.inputs and out.inputs[0].op == "Cast" else None
        end = cast.inputs[0] if cast is not None else out
        dq = end.inputs[0] if end.inputs else None
        q = dq.inputs[0].inputs[0] if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[0].inputs else None
        if q is None or q.op != "QuantizeLinear" or len(dq.inputs[0].outputs) != 1:
            continue
        if cast is not None and len(end.outputs) != 1:
            continue
        x = q.inputs[0]
        producer = x.inputs[0] if x.inputs else None
        if producer is None or producer.op not in FLOAT_OUTPUT_OPS or len(x.outputs) != 1 or x in graph.outputs:
            continue
        if direct is not None and (behind.get(out.name) if cast is not None else out.name) not in direct:
            continue  # (what the float model's Cast reads must be a Gemm's output, as the output itself is above)
        if cast is not None:
            cast.inputs[0] = x
        else:
            producer.outputs[producer.outputs.index(x)] = out  # the Gemm writes the output itself
            dq.outputs.clear()
        changed.append(out.name)
    if not changed:
        return model, []
    graph.cleanup().toposort()
    return to_model(graph, like=model), changed
