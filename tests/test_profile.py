"""Params, MACs and bytes per layer, checked against hand counts."""


import pytest

from surgeon import model as model_io, profile
from tests.models import CNN, MLP, conv_model, init, make_model, tensor


def test_conv_macs_by_hand():
    m = conv_model(c=16, f=32, k=3, hw=12, bias=True)
    p = profile(m)
    (conv,) = p.layers
    assert conv.params == 32 * 16 * 9 + 32
    assert conv.macs == 32 * 12 * 12 * 16 * 9
    assert conv.bytes == conv.params * 4


@pytest.mark.parametrize("op, gates, layout", [("LSTM", 4, 0), ("GRU", 3, 1), ("RNN", 1, 0)])
def test_recurrent_layers_count_by_hand(op, gates, layout):
    """The OCR recognizer's bidirectional LSTM (4.2M of its 13.5M parameters) was missing from
    the per-layer table and its MACs from the total."""
    import numpy as np
    from onnx import helper
    hidden, features, seq, batch = 8, 6, 5, 3
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, gates * hidden, features)).astype(np.float32)
    r = rng.standard_normal((2, gates * hidden, hidden)).astype(np.float32)
    b = np.zeros((2, 2 * gates * hidden), np.float32)
    x_shape = [batch, seq, features] if layout else [seq, batch, features]
    y_shape = [batch, seq, 2, hidden] if layout else [seq, 2, batch, hidden]
    node = helper.make_node(op, ["x", "w", "r", "b"], ["y"], name="rec", hidden_size=hidden,
                            direction="bidirectional", layout=layout)
    m = make_model([node], [tensor("x", x_shape)], [tensor("y", y_shape)], [init("w", w), init("r", r), init("b", b)],
                   opset=14)
    (layer,) = profile(m).layers
    assert layer.op == op and layer.weight_shape == [2, gates * hidden, features]
    assert layer.params == w.size + r.size + b.size and layer.bytes == 4 * layer.params
    assert layer.macs == seq * batch * 2 * gates * hidden * (features + hidden)


def test_strided_conv_macs():
    m = conv_model(c=8, f=8, k=3, hw=12, strides=(2, 2))
    assert profile(m).layers[0].macs == 8 * 6 * 6 * 8 * 9


def test_sample_cnn_totals():
    p = profile(model_io.load(CNN))
    names = [l.name for l in p.layers]
    assert names == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2"]
    fc1 = p.layers[5]
    assert fc1.weight_shape == [128, 2048] and fc1.macs == 2048 * 128
    assert p.total_macs == sum(l.macs for l in p.layers)


def test_batch_scales_macs_not_params():
    m = model_io.load(MLP)
    p1 = profile(m, {"input": (1, 64)})
    p8 = profile(m, {"input": (8, 64)})
    assert p8.total_macs == 8 * p1.total_macs
    assert p8.total_params == p1.total_params


# --- shapes without asking (issue 8) ---------------------------------------------------------------

import numpy as np  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from surgeon import engine  # noqa: E402
import importlib  # noqa: E402

profile_module = importlib.import_module("surgeon.profile")  # the package exports the function under this name
from surgeon.profile import tensor_shapes  # noqa: E402
from tests.models import detector_model  # noqa: E402


def reshape_chain_model(through_float: bool = False):
    """A Paddle2ONNX-style MatMul behind Shape -> Gather x2 -> Mul -> Unsqueeze -> Concat ->
    Reshape (x [N, 8, 64] -> [N, 512]), where ONNX shape inference stops at the Mul. With
    `through_float` the product also passes through Cast/Mul/Sqrt, where onnxruntime's symbolic
    shape inference gives up as well; only a real run knows the shape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Gather", ["s", "i2"], ["c"], axis=0), helper.make_node("Mul", ["t", "c"], ["tc"])]
    if through_float:
        nodes += [helper.make_node("Cast", ["tc"], ["f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["f", "f"], ["f2"]), helper.make_node("Sqrt", ["f2"], ["fs"]),
                  helper.make_node("Cast", ["fs"], ["tc2"], to=TensorProto.INT64)]
    nodes += [helper.make_node("Unsqueeze", ["tc2" if through_float else "tc", "ax"], ["tcu"]),
              helper.make_node("Concat", ["m1", "tcu"], ["shape"], axis=0),
              helper.make_node("Reshape", ["x", "shape"], ["r"]),
              helper.make_node("MatMul", ["r", "w"], ["y"], name="fc")]
    inits = [init("i1", np.array(1, np.int64)), init("i2", np.array(2, np.int64)), init("ax", np.array([0], np.int64)),
             init("m1", np.array([-1], np.int64)), init("w", np.ones((512, 32), np.float32))]
    return engine.prepare(make_model(nodes, [tensor("x", ["N", 8, 64])], [tensor("y", None)], inits, opset=13))


def test_matmul_behind_a_reshape_chain_is_counted(monkeypatch):
    """Issue 8: on a Paddle2ONNX recognizer every MatMul showed MACs 0 (shape inference failed)."""
    m = reshape_chain_model()
    assert tensor_shapes(m, {"x": (2, 8, 64)}, run=False)["r"] == (2, 512)
    (fc,) = profile(m, {"x": (2, 8, 64)}).layers
    assert fc.macs == 2 * 512 * 32
    # ONNX's own inference alone does not get there (onnxruntime's symbolic inference did)
    monkeypatch.setattr(profile_module, "_symbolic_infer", lambda model: None)
    assert "r" not in tensor_shapes(m, {"x": (2, 8, 64)}, run=False)
    assert profile(m, {"x": (2, 8, 64)}).layers[0].macs == 2 * 512 * 32  # and a real run gets there too


def test_shapes_only_a_real_run_knows():
    m = reshape_chain_model(through_float=True)
    assert "r" not in tensor_shapes(m, {"x": (2, 8, 64)}, run=False)
    assert tensor_shapes(m, {"x": (2, 8, 64)})["r"] == (2, 512)
    assert profile(m, {"x": (2, 8, 64)}).layers[0].macs == 2 * 512 * 32


def test_unknown_macs_are_none_never_zero_and_say_what_to_pass():
    p = profile(detector_model())
    assert p.total_macs is None and p.layers and all(l.macs is None for l in p.layers)
    assert p.macs_note.startswith("MACs unknown for 6 layer(s)") and "--shape images=1x3x?x?" in p.macs_note
    assert p.to_json()["macs_unknown"] == [l.name for l in p.layers]
    assert p.total_params > 0  # what needs no shape is still counted


def test_data_gives_the_shapes():
    from surgeon.calibration import DataSet
    data = DataSet({"images": np.zeros((3, 3, 16, 16), np.float32)}, batch=1)
    p = profile(detector_model(), data=data)
    assert p.total_macs > 0 and p.macs_note is None


def test_a_model_onnxruntime_cannot_run_still_profiles():
    """A custom-domain op: no real run is possible; what shape inference found still counts."""
    m = make_model([helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
                    helper.make_node("Mystery", ["h"], ["h2"], domain="custom.ops"),
                    helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2")],
                   [tensor("x", [1, 16])], [tensor("y", None)],
                   [init("w", np.ones((8, 16), np.float32)), init("w2", np.ones((8, 4), np.float32))])
    m.opset_import.append(helper.make_opsetid("custom.ops", 1))
    p = profile(m)
    assert [l.macs for l in p.layers] == [128, None] and p.total_macs is None
    assert "could not be resolved" in p.macs_note


def test_fp16_model_profiles_in_its_own_bytes():
    p = profile(detector_model(dtype=np.float16), {"images": (1, 3, 16, 16)})
    stem = p.layers[0]
    assert stem.bytes == stem.params * 2 and stem.macs == 16 * 8 * 8 * 27
