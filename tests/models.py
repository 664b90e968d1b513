"""Small golden graphs built in-test, and helpers every transform test uses.

Builders return ModelProtos with seeded weights; `run`/`assert_close_outputs` compare
onnxruntime results before and after a rewrite; `checked` runs onnx.checker (full).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import surgeon
from surgeon.validate import session

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
CNN = SAMPLES / "digits_cnn.onnx"
CNN_TEST = SAMPLES / "digits_cnn_test.npz"
CNN_CALIB = SAMPLES / "digits_cnn_calib.npz"
MLP = SAMPLES / "digits_mlp.onnx"
MLP_TEST = SAMPLES / "digits_mlp_test.npz"
MLP_CALIB = SAMPLES / "digits_mlp_calib.npz"


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def tensor(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def conv_model(c=16, f=32, k=3, hw=12, group=1, bias=True, seed=0, strides=(1, 1), pads=None, dilations=(1, 1),
               auto_pad=None, relu=True, batch=1) -> onnx.ModelProto:
    """x -> Conv -> (Relu) -> y with seeded weights."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((f, c // group, k, k)) * np.sqrt(2 / (c * k * k))).astype(np.float32)
    inits = [init("w", w)]
    ins = ["x", "w"]
    if bias:
        inits.append(init("b", rng.standard_normal(f).astype(np.float32) * 0.1))
        ins.append("b")
    attrs = dict(kernel_shape=[k, k], strides=list(strides), dilations=list(dilations), group=group)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads) if pads is not None else [k // 2] * 4
    nodes = [helper.make_node("Conv", ins, ["h" if relu else "y"], name="conv", **attrs)]
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["y"], name="relu"))
    return make_model(nodes, [tensor("x", [batch, c, hw, hw])], [tensor("y", [batch, f, None, None])], inits)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def random_feeds(model: onnx.ModelProto, samples: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    ds = surgeon.synthesize(model, samples=samples, seed=seed)
    return next(ds.batches(samples))


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(a.astype(np.float64)), 1e-30))


def assert_close_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds, rtol: float = 1e-4) -> float:
    """Both models run in onnxruntime on `feeds`; every output's relative L2 error <= rtol."""
    ra, rb = run(before, feeds), run(after, feeds)
    worst = 0.0
    for a, b in zip(ra, rb):
        assert a.shape == b.shape
        worst = max(worst, rel_l2(a, b))
    assert worst <= rtol, f"relative L2 drift {worst:.3g} > {rtol}"
    return worst


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    from collections import Counter
    return dict(Counter(n.op_type for n in model.graph.node))
