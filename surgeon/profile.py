"""Parameters, multiply-accumulates and bytes per layer.

Works on the ModelProto with shapes from ONNX shape inference (inputs made concrete first),
and sees through DequantizeLinear so that QDQ int8 models count their int8 weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import onnx

from surgeon.calibration import resolve_shapes
from surgeon.model import infer_shapes

# ops whose cost we count; the rest of a network (activations, pooling, adds) is cheap in comparison
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "ConvInteger", "MatMulInteger",
                "QLinearMatMul", "MatMulNBits", "FusedConv", "FusedMatMul"}


@dataclass
class LayerCost:
    name: str
    op: str
    weight_shape: list[int] | None
    params: int
    macs: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Profile:
    layers: list[LayerCost] = field(default_factory=list)
    total_params: int = 0  # every initializer element, weighted layers or not
    total_macs: int = 0
    weight_bytes: int = 0  # bytes of every initializer
    file_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"layers": [l.to_json() for l in self.layers], "total_params": self.total_params,
                "total_macs": self.total_macs, "weight_bytes": self.weight_bytes, "file_bytes": self.file_bytes}


def profile(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Profile:
    shapes = tensor_shapes(model, input_shapes)
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
    prof.total_macs = sum(l.macs for l in prof.layers)
    prof.weight_bytes = sum(_nbytes(t) for t in inits.values())
    prof.file_bytes = model.ByteSize()
    return prof


def _is_param(t: onnx.TensorProto) -> bool:
    # shape tensors and quantization scales/zero points are bookkeeping, not parameters
    return t.data_type not in (onnx.TensorProto.INT64,) and math.prod(t.dims) > 1


def _nbytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def tensor_shapes(model: onnx.ModelProto, input_shapes) -> dict[str, tuple[int, ...]]:
    try:
        concrete = resolve_shapes(model, input_shapes)
    except Exception:
        concrete = {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in concrete:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, concrete[vi.name]):
                d.Clear()
                d.dim_value = v
    m = infer_shapes(m)
    out: dict[str, tuple[int, ...]] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    for t in m.graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _cost(node: onnx.NodeProto, shapes, weight) -> LayerCost | None:
    op = node.op_type
    w_index = {"QLinearConv": 3, "QLinearMatMul": 3}.get(op, 1)
    if len(node.input) <= w_index:
        return None
    w = weight(node.input[w_index])
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
    macs = 0
    if op == "MatMulNBits":
        k, n = _attr(node, "K", 0), _attr(node, "N", 0)
        a_shape = shapes.get(node.input[0])
        rows = math.prod(a_shape[:-1]) if a_shape else 0
        params = k * n
        wshape = [k, n]
        nbytes = sum(_nbytes(weight(i)) for i in node.input[1:] if i and weight(i) is not None)
        macs = rows * k * n
    elif op in ("Conv", "QLinearConv", "ConvInteger", "FusedConv") and wshape and out_shape:
        macs = math.prod(out_shape) * math.prod(wshape[1:])
    elif op == "ConvTranspose" and wshape:
        in_shape = shapes.get(node.input[0])
        if in_shape:  # each input element scatters a (f/g) x k x k window; W is (c, f/g, k, k)
            macs = math.prod(in_shape) * math.prod(wshape[1:])
    elif op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a_shape = shapes.get(node.input[0])
        b_shape = tuple(wshape) if wshape else shapes.get(node.input[w_index])
        if a_shape and b_shape and out_shape:
            if op == "Gemm":
                k = a_shape[0] if _attr(node, "transA", 0) else a_shape[-1]
            else:
                k = a_shape[-1]
            macs = math.prod(out_shape) * k
    if w is None and macs == 0:
        return None
    return LayerCost(node.name or node.output[0], op, wshape, int(params), int(macs), int(nbytes))
