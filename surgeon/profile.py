"""Parameters, multiply-accumulates and bytes per layer.

Works on the ModelProto with shapes from ONNX shape inference (inputs made concrete first),
and sees through DequantizeLinear so that QDQ int8 models count their int8 weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from surgeon.calibration import resolve_shapes
from surgeon.model import infer_shapes, scratch_cwd

log = logging.getLogger(__name__)

# ops whose cost we count; the rest of a network (activations, pooling, adds) is cheap in comparison
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "ConvInteger", "MatMulInteger",
                "QLinearMatMul", "MatMulNBits", "FusedConv", "FusedMatMul", "LSTM", "GRU", "RNN",
                "DynamicQuantizeLSTM"}
# gates per step of a recurrent layer: each is a (hidden x input) and a (hidden x hidden) product
RECURRENT_GATES = {"LSTM": 4, "DynamicQuantizeLSTM": 4, "GRU": 3, "RNN": 1}


@dataclass
class LayerCost:
    name: str
    op: str
    weight_shape: list[int] | None
    params: int
    macs: int | None  # None: the shapes it needs are unknown (never reported as 0)
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Profile:
    layers: list[LayerCost] = field(default_factory=list)
    total_params: int = 0  # every initializer element, weighted layers or not
    total_macs: int | None = 0  # None when any layer's MACs are unknown
    weight_bytes: int = 0  # bytes of every initializer
    file_bytes: int = 0
    macs_note: str | None = None  # why some MACs are unknown, and what to pass

    @property
    def macs_unknown(self) -> list[str]:
        return [l.name for l in self.layers if l.macs is None]

    def to_json(self) -> dict[str, Any]:
        return {"layers": [l.to_json() for l in self.layers], "total_params": self.total_params,
                "total_macs": self.total_macs, "macs_unknown": self.macs_unknown, "macs_note": self.macs_note,
                "weight_bytes": self.weight_bytes, "file_bytes": self.file_bytes}


def profile(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...] | None] | None = None, *,
            data: Any = None, shapes: dict[str, tuple[int, ...]] | None = None) -> Profile:
    """Per-layer cost. Input shapes come from `input_shapes`, else from `data`; a dynamic
    batch dim counts as 1. MACs that need shapes nobody gave are None, with `macs_note`
    saying what to pass. `shapes` (every tensor's, from `tensor_shapes`) skips the inference."""
    from surgeon.calibration import shape_hint, shapes_from_data
    known = resolve_shapes(model, {**shapes_from_data(data), **(input_shapes or {})}, required=False)
    if shapes is None:
        shapes = tensor_shapes(model, known, data=data)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def weight(name: str) -> onnx.TensorProto | None:
        """An initializer, directly or behind DequantizeLinear / a Transpose of one."""
        if name in inits:
            return inits[name]
        p = producer.get(name)
        if p is not None and p.op_type in ("DequantizeLinear", "Transpose", "Identity", "Cast") and p.input[0] in inits:
            return inits[p.input[0]]
        return None

    prof = Profile()
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        cost = _cost(node, shapes, weight)
        if cost is not None:
            prof.layers.append(cost)
    prof.total_params = sum(math.prod(t.dims) for t in inits.values() if _is_param(t))
    unknown = prof.macs_unknown
    prof.total_macs = None if unknown else sum(l.macs for l in prof.layers)
    if unknown:
        hint = shape_hint(model, known)
        prof.macs_note = (f"MACs unknown for {len(unknown)} layer(s) ({', '.join(unknown[:3])}"
                          f"{', ...' if len(unknown) > 3 else ''}): " + (hint or "their shapes could not be resolved "
                                                                          "(onnxruntime could not run the model)"))
    prof.weight_bytes = sum(_nbytes(t) for t in inits.values())
    prof.file_bytes = model.ByteSize()
    return prof


def _is_param(t: onnx.TensorProto) -> bool:
    # shape tensors and quantization scales/zero points are bookkeeping, not parameters
    return t.data_type not in (onnx.TensorProto.INT64,) and math.prod(t.dims) > 1


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _nbytes(t: onnx.TensorProto) -> int:
    """Bytes of the tensor's values, from its dims and element type: reading `raw_data` would
    copy hundreds of MB out of the proto for a large model."""
    n = math.prod(t.dims)
    if t.data_type in _FOUR_BIT:
        return (n + 1) // 2
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(x) for x in t.string_data)
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return len(t.raw_data)


def tensor_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...] | None] | None = None, *,
                  data: Any = None, run: bool = True) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor we can find, from three sources in turn:

    1. ONNX shape inference with the known input shapes made concrete;
    2. onnxruntime's symbolic shape inference, which folds the Shape/Gather/Concat/Reshape
       chains some exporters (Paddle2ONNX, older PyTorch) put in front of MatMul and Gemm;
    3. when every input shape is known and a weighted node's tensors are still unresolved, one
       real onnxruntime run (on a row of `data`, else on seeded synthesized inputs) that reads
       every such tensor's shape.

    Inputs whose shape is unknown (symbolic non-batch dims, nothing given) stay symbolic; their
    dependants simply have no entry. Never raises for shapes: a missing entry means "unknown".
    """
    known = resolve_shapes(model, input_shapes, required=False)
    m = _skeleton(model, known)
    out: dict[str, tuple[int, ...]] = {}
    _merge_static(out, infer_shapes(m))
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    wanted = _weighted_tensors(model)
    concrete = bool(known) and all(v is not None for v in known.values())
    # with a symbolic input left, what ONNX could not resolve depends on it: symbolic shapes
    # would not be static either, so skip the (slow, on big models) symbolic pass
    if concrete and any(t not in out for t in wanted):
        _merge_static(out, _symbolic_infer(m))
    missing = [t for t in wanted if t not in out]
    if missing and run and concrete:
        out.update(_run_shapes(model, missing, known, data))
    return out


SKELETON_MAX_ELEMENTS = 4096  # initializers up to this size keep their values (shape tensors, scales)


def _skeleton(model: onnx.ModelProto, known: dict[str, tuple[int, ...] | None]) -> onnx.ModelProto:
    """The model for shape inference: known input dims made concrete, and every large
    initializer replaced by a graph input of the same type and shape. Inference needs only
    their shapes, and copying and serializing hundreds of MB of weights (VGG, AlexNet) took
    seconds per call."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = model.graph
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.output.extend(g.output)
    m.graph.value_info.extend(g.value_info)
    inits = {t.name for t in g.initializer}
    for vi in g.input:
        if vi.name in inits:
            continue  # ir_version < 4 lists weights among inputs: they are added below
        vi = m.graph.input.add(name=vi.name, type=vi.type)
        if known.get(vi.name) is not None:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, known[vi.name]):
                d.Clear()
                d.dim_value = v
    for t in g.initializer:
        if math.prod(t.dims) <= SKELETON_MAX_ELEMENTS:
            m.graph.initializer.append(t)
        else:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.graph.sparse_initializer.extend(g.sparse_initializer)
    return m


def _merge_static(out: dict[str, tuple[int, ...]], m: onnx.ModelProto | None) -> None:
    if m is None:
        return
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        if vi.name in out or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)


def _weighted_tensors(model: onnx.ModelProto) -> list[str]:
    """Run-time tensors read or written by the nodes whose cost we count (what MACs and the guard need)."""
    inits = {t.name for t in model.graph.initializer}
    names = []
    for n in model.graph.node:
        if n.op_type in WEIGHTED_OPS:
            names += [t for t in list(n.input) + list(n.output) if t and t not in inits]
    return list(dict.fromkeys(names))


def _symbolic_infer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        with scratch_cwd():  # it leaves sym_shape_infer_temp.onnx in the cwd when it gives up
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # unknown ops, custom domains: it gives up, and so do we, quietly
        log.info("symbolic shape inference failed: %s", str(exc).strip().splitlines()[0][:200] if str(exc).strip()
                 else type(exc).__name__)
        return None


def _run_shapes(model: onnx.ModelProto, tensors: list[str], known: dict[str, tuple[int, ...]],
                data: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of `tensors` in one onnxruntime run at the `known` input shapes."""
    from surgeon.calibration import synthesize
    from surgeon.validate import stream_tensors
    batch = max((s[0] for s in known.values() if s), default=1)
    feed = None
    if data is not None and all(n in data.inputs and tuple(data.inputs[n].shape[1:]) ==
                                (tuple(s) if data.stacked else tuple(s[1:])) for n, s in known.items()) \
            and len(data) >= batch:
        feed = data.take(batch)
    try:
        if feed is None:
            feed = synthesize(model, known, samples=batch)
        # exactly one feed: a whole row of a set without a batch axis, else `batch` rows
        feed = feed.take(1) if feed.stacked else dataclasses.replace(feed.take(batch), labels=None, batch=batch)
        for values in stream_tensors(model, tensors, feed, batch=batch):
            return {t: tuple(int(d) for d in np.shape(v)) for t, v in values.items()}
    except Exception as exc:  # a model onnxruntime cannot run: those layers stay uncounted, and say so
        log.info("could not run the model to read intermediate shapes: %s",
                 str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
    return {}


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _recurrent_cost(node: onnx.NodeProto, shapes, weight) -> LayerCost | None:
    """LSTM / GRU / RNN (ONNX layout: X is (seq, batch, input), or (batch, seq, input) with
    layout=1): W, R and B are the parameters; per step and direction, each gate multiplies the
    input by a (hidden x input) matrix and the state by a (hidden x hidden) one."""
    tensors = [weight(i) for i in node.input[1:4] if i]
    if not tensors or any(t is None for t in tensors[:2]):
        return None
    hidden = _attr(node, "hidden_size", 0)
    directions = 2 if _attr(node, "direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    x = shapes.get(node.input[0])
    macs = None
    if x is not None and len(x) == 3 and hidden:
        seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
        macs = seq * batch * directions * RECURRENT_GATES[node.op_type] * hidden * (x[2] + hidden)
    return LayerCost(node.name or node.output[0], node.op_type, list(tensors[0].dims),
                     int(sum(math.prod(t.dims) for t in tensors if t is not None)),
                     None if macs is None else int(macs), int(sum(_nbytes(t) for t in tensors if t is not None)))


def _cost(node: onnx.NodeProto, shapes, weight) -> LayerCost | None:
    op = node.op_type
    if op in RECURRENT_GATES:
        return _recurrent_cost(node, shapes, weight)
    w_index = {"QLinearConv": 3, "QLinearMatMul": 3}.get(op, 1)
    if len(node.input) <= w_index:
        return None
    w = weight(node.input[w_index])
    if w is None and op == "MatMul" and weight(node.input[0]) is not None:
        w = weight(node.input[0])  # the constant on the left: W @ x
    out_shape = shapes.get(node.output[0])
    params = 0
    nbytes = 0
    wshape = None
    if w is not None:
        wshape = list(w.dims)
        params += math.prod(w.dims)
        nbytes += _nbytes(w)
        b_index = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "QLinearConv": 8, "FusedConv": 2}.get(op)
        if b_index is not None and len(node.input) > b_index and node.input[b_index]:
            b = weight(node.input[b_index])
            if b is not None:
                params += math.prod(b.dims)
                nbytes += _nbytes(b)
    macs = None
    if op == "MatMulNBits":
        k, n = _attr(node, "K", 0), _attr(node, "N", 0)
        a_shape = shapes.get(node.input[0])
        params = k * n
        wshape = [k, n]
        nbytes = sum(_nbytes(weight(i)) for i in node.input[1:] if i and weight(i) is not None)
        macs = math.prod(a_shape[:-1]) * k * n if a_shape is not None else None
    elif op in ("Conv", "QLinearConv", "ConvInteger", "FusedConv") and wshape and out_shape is not None:
        macs = math.prod(out_shape) * math.prod(wshape[1:])
    elif op == "ConvTranspose" and wshape:
        in_shape = shapes.get(node.input[0])
        if in_shape is not None:  # each input element scatters a (f/g) x k x k window; W is (c, f/g, k, k)
            macs = math.prod(in_shape) * math.prod(wshape[1:])
    elif op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a_shape = shapes.get(node.input[0])
        b_shape = tuple(wshape) if wshape else shapes.get(node.input[w_index])
        if a_shape is not None and b_shape is not None and out_shape is not None:
            if op == "Gemm":
                k = a_shape[0] if _attr(node, "transA", 0) else a_shape[-1]
            else:
                k = a_shape[-1] if a_shape else 1
            macs = math.prod(out_shape) * k
    if w is None and not macs:
        return None  # two run-time operands (attention scores): not a layer with weights
    return LayerCost(node.name or node.output[0], op, wshape, int(params), None if macs is None else int(macs),
                     int(nbytes))
