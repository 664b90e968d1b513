"""int8 on the ordinary variants users bring (issue 8): each node quantizes or stays in float with a
stated reason, never onnxruntime's raw exception text."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import surgeon
from surgeon.calibration import DataSet
from surgeon.plugins import int8_prepare as ip
from tests.models import checked, init, make_model, rel_l2, run, tensor

RAW_ORT_TEXT = ("truth value", "No data is collected", "could not be broadcast", "zero-dimensional",
                "Please fix either", "too many indices")


def _data(model: onnx.ModelProto, n: int = 24, seed: int = 1, batch: int | None = None) -> DataSet:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.standard_normal((n, *dims[1:])).astype(dtype)
    return DataSet(feeds, source="test", batch=batch)


def _quantized(model: onnx.ModelProto, name: str) -> bool:
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == name)
    return any(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input[:2])


def _layer(result, name):
    return next(l for l in result.layers if l.layer == name)


def gemm_model(c_shape, beta=1.0, trans_a=0, m=8, k=16, n=12, seed=0):
    rng = np.random.default_rng(seed)
    inits = [init("w", rng.standard_normal((k, n)).astype(np.float32) * 0.3)]
    ins = ["x", "w"]
    if c_shape is not None:
        inits.append(init("c", rng.standard_normal(c_shape).astype(np.float32)))
        ins.append("c")
    x_shape = [k, m] if trans_a else [m, k]
    nodes = [helper.make_node("Gemm", ins, ["h"], name="gemm", beta=beta, transA=trans_a),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return make_model(nodes, [tensor("x", x_shape)], [tensor("y", [m, n])], inits)


@pytest.mark.parametrize("c_shape,beta", [((), 1.0), ((1, 12), 1.0), ((12,), 0.5), ((8, 12), 1.0), ((8, 1), 2.0)])
def test_gemm_bias_of_any_broadcastable_shape_is_rewritten_exactly_and_quantized(c_shape, beta):
    model = gemm_model(c_shape, beta)
    prepared = ip.prepare_for_ort(surgeon.engine.prepare(model))
    feeds = {"x": np.random.default_rng(3).standard_normal((8, 16)).astype(np.float32)}
    assert rel_l2(run(model, feeds)[0], run(checked(prepared.model), feeds)[0]) < 1e-6
    gemm = next(n for n in prepared.model.graph.node if n.op_type == "Gemm")
    if len(gemm.input) > 2:  # C kept on the Gemm: 1-D of length N, beta folded in
        c = next(t for t in prepared.model.graph.initializer if t.name == gemm.input[2])
        assert list(c.dims) == [12]
    data = _data(model, batch=8)
    res = surgeon.apply(model, "int8", {}, data=data)
    out = checked(res.model)
    assert _quantized(out, "gemm") and _layer(res, "gemm").status == "rewritten"
    feeds = data.first_batch()  # within the calibrated ranges
    assert rel_l2(run(model, feeds)[0], run(out, feeds)[0]) < 0.03


def test_gemm_trans_a_and_matmul_with_the_constant_on_the_left_quantize():
    a = gemm_model((12,), trans_a=1)
    rng = np.random.default_rng(0)
    b = make_model([helper.make_node("MatMul", ["w", "x"], ["h"], name="mm"),
                    helper.make_node("Relu", ["h"], ["y"], name="relu")],
                   [tensor("x", [16, 6])], [tensor("y", [10, 6])],
                   [init("w", rng.standard_normal((10, 16)).astype(np.float32) * 0.3)])
    for model, name in ((a, "gemm"), (b, "mm")):
        data = _data(model, 32, batch=model.graph.input[0].type.tensor_type.shape.dim[0].dim_value)
        res = surgeon.apply(model, "int8", {}, data=data)
        out = checked(res.model)
        assert _quantized(out, name), name
        feeds = data.first_batch()
        assert rel_l2(run(model, feeds)[0], run(out, feeds)[0]) < 0.05


def test_grouped_conv_transpose_stays_in_float_with_the_reason():
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["h"], name="deconv", group=2, strides=[2, 2]),
                        helper.make_node("Relu", ["h"], ["y"], name="relu")],
                       [tensor("x", ["N", 8, 6, 6])], [tensor("y", ["N", 6, 13, 13])],
                       [init("w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
                        init("b", rng.standard_normal(6).astype(np.float32))])
    res = surgeon.apply(model, "int8", {}, data=_data(model))
    rep = _layer(res, "deconv")
    assert rep.status == "skipped" and "group=2" in rep.reason
    assert not _quantized(checked(res.model), "deconv")


def test_weight_also_read_by_another_op_with_a_scalar_output():
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                        helper.make_node("ReduceSum", ["w"], ["s"], name="wsum", keepdims=0)],
                       [tensor("x", ["N", 16])], [tensor("y", ["N", 16]), tensor("s", [])],
                       [init("w", rng.standard_normal((16, 16)).astype(np.float32))], opset=13)
    data = _data(model)
    res = surgeon.apply(model, "int8", {}, data=data)
    out = checked(res.model)
    assert _quantized(out, "mm")
    feeds = data.first_batch(8)
    ref, got = run(model, feeds), run(out, feeds)
    assert rel_l2(ref[0], got[0]) < 0.05
    assert got[1].shape == () and abs(float(got[1]) - float(ref[1])) < 1e-3  # the other reader sees float w


def test_weight_that_is_a_graph_input_stays_in_float_with_the_reason():
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm"),
                        helper.make_node("Relu", ["h"], ["y"], name="relu")],
                       [tensor("x", [16, 16]), tensor("w", [16, 16])], [tensor("y", [16, 16])])
    res = surgeon.apply(model, "int8", {}, data=_data(model, 16, batch=16))
    rep = _layer(res, "gemm")
    assert rep.status == "skipped" and "'w' is a graph input" in rep.reason
    checked(res.model)


def test_float16_model_quantizes_and_keeps_its_float16_interface():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float16)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", ["h"], ["y"], name="relu")],
                       [tensor("x", ["N", 3, 8, 8], TensorProto.FLOAT16)],
                       [tensor("y", ["N", 8, 8, 8], TensorProto.FLOAT16)], [init("w", w)])
    data = _data(model, 32)
    res = surgeon.apply(model, "int8", {}, data=data)
    out = checked(res.model)
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert _quantized(out, "conv")
    feeds = data.first_batch(8)
    ref, got = run(model, feeds)[0], run(out, feeds)[0]
    assert got.dtype == np.float16 and rel_l2(ref.astype(np.float32), got.astype(np.float32)) < 0.05


def test_a_float16_tensor_attribute_becomes_float32_with_the_graph():
    """onnxruntime's float16 converter makes ConstantOfShape's value float16 (the OCR recognizer's
    LSTM initial states): in the float32 graph quantization works on, its output kept float16,
    and onnxruntime refused the model ("Type (tensor(float)) of output arg ... does not match")."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float16)
    fill = onnx.numpy_helper.from_array(np.array([0.25], np.float16))
    model = make_model([helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
                        helper.make_node("Shape", ["h"], ["s"], name="shape"),
                        helper.make_node("ConstantOfShape", ["s"], ["c"], name="fill", value=fill),
                        helper.make_node("Add", ["h", "c"], ["y"], name="add")],
                       [tensor("x", ["N", 3, 8, 8], TensorProto.FLOAT16)],
                       [tensor("y", ["N", 8, 8, 8], TensorProto.FLOAT16)], [init("w", w)])
    data = _data(model, 32)
    res = surgeon.apply(model, "int8", {}, data=data)
    out = checked(res.model)
    assert _quantized(out, "conv")
    feeds = data.first_batch(8)
    ref, got = run(model, feeds)[0], run(out, feeds)[0]
    assert got.dtype == np.float16 and rel_l2(ref.astype(np.float32), got.astype(np.float32)) < 0.05


def test_no_variant_shows_onnxruntimes_raw_text(capsys):
    """The CLI path on each variant: exit 0, nothing of onnxruntime's internal messages."""
    for model in (gemm_model(()), gemm_model((1, 12)), gemm_model((8, 12))):
        res = surgeon.apply(model, "int8", {}, data=_data(model, batch=8))
        text = " ".join(l.reason for l in res.layers) + capsys.readouterr().err
        assert not any(s in text for s in RAW_ORT_TEXT)


def test_a_model_saved_after_onnxruntimes_fusions_is_refused_with_the_reason(tmp_path):
    """onnxruntime's quantizer failed on its own FusedConv outputs with "Unable to get valid
    quantization scale for input ...", and with their types given it left them float: slower
    than the original. The CLI says what to quantize instead and writes nothing."""
    import onnxruntime as ort
    from typer.testing import CliRunner
    from surgeon.cli import app
    from tests.models import conv_model
    src, fused = tmp_path / "conv.onnx", tmp_path / "fused.onnx"
    onnx.save(conv_model(), str(src))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(fused)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    assert [(n.domain, n.op_type) for n in onnx.load(str(fused)).graph.node] == [("com.microsoft", "FusedConv")]
    r = CliRunner().invoke(app, ["apply", str(fused), "-p", "int8", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2, r.output
    assert "onnxruntime's own fused nodes (FusedConv x1)" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "q.onnx").exists()
