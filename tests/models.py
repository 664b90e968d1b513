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


def detector_model(seed: int = 0, dtype=np.float32, c: int = 16) -> onnx.ModelProto:
    """A YOLO-like detector with dynamic height and width: input [1, 3, 'h', 'w'].

    stem conv (stride 2) -> two branch convs -> Concat -> 1x1 conv -> residual Add -> Resize x2
    -> 3x3 conv -> Transpose to NHWC -> MatMul head (channels -> 6) -> output [1, 'h', 'w', 6].
    Every dim but batch and channels is symbolic, so no rewrite may ask for a concrete shape."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(dtype)

    def conv(name, x, y, cin, cout, k, stride=1):
        inits.extend([init(f"{name}.w", w(cout, cin, k, k)), init(f"{name}.b", (rng.standard_normal(cout) * 0.1).astype(dtype))])
        return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, kernel_shape=[k, k],
                                strides=[stride, stride], pads=[k // 2] * 4)

    inits: list = []
    nodes = [
        conv("stem", "images", "s", 3, c, 3, stride=2), helper.make_node("Relu", ["s"], ["s_r"], name="stem_relu"),
        conv("branch_a", "s_r", "a", c, c, 3), conv("branch_b", "s_r", "b", c, c, 3),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        conv("fuse", "cat", "f", 2 * c, c, 1),
        helper.make_node("Add", ["f", "s_r"], ["res"], name="residual"),
        helper.make_node("Resize", ["res", "", "scales"], ["up"], name="upsample", mode="nearest"),
        conv("neck", "up", "n", c, 2 * c, 3), helper.make_node("Relu", ["n"], ["n_r"], name="neck_relu"),
        helper.make_node("Transpose", ["n_r"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["nhwc", "head.w"], ["out"], name="head"),
    ]
    inits += [init("scales", np.array([1, 1, 2, 2], np.float32)), init("head.w", w(2 * c, 6))]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model(nodes, [tensor("images", [1, 3, "h", "w"], elem)], [tensor("out", [1, "H", "W", 6], elem)],
                      inits, opset=13)


# --- structured pruning (tests/test_prune.py, tests/test_channel_groups.py) ----------------------

class _PruneGraph:
    """A tiny builder for pruning test graphs: seeded weights, conv / BN / ops by name."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []

    def w(self, name: str, shape, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        v = self.rng.standard_normal(shape) * (scale if scale is not None else np.sqrt(2.0 / fan_in))
        self.inits.append(init(name, v.astype(np.float32)))
        return name

    def const(self, name: str, value) -> str:
        self.inits.append(init(name, np.asarray(value)))
        return name

    def op(self, op: str, name: str, inputs, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, name: str, x: str, c_in: int, c_out: int, k: int = 3, group: int = 1, bias: bool = True,
             stride: int = 1) -> str:
        ins = [x, self.w(f"{name}.w", (c_out, c_in // group, k, k))]
        if bias:
            ins.append(self.w(f"{name}.b", (c_out,), 0.1))
        return self.op("Conv", name, ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride] * 2)

    def bn(self, name: str, x: str, c: int) -> str:
        r = self.rng
        ins = [x, self.const(f"{name}.g", r.uniform(0.5, 1.5, c).astype(np.float32)),
               self.const(f"{name}.b", (r.standard_normal(c) * 0.1).astype(np.float32)),
               self.const(f"{name}.m", (r.standard_normal(c) * 0.1).astype(np.float32)),
               self.const(f"{name}.v", r.uniform(0.5, 1.5, c).astype(np.float32))]
        return self.op("BatchNormalization", name, ins)

    def cbr(self, name: str, x: str, c_in: int, c_out: int, k: int = 3, **kw) -> str:
        return self.op("Relu", f"{name}.relu", [self.bn(f"{name}.bn", self.conv(name, x, c_in, c_out, k, **kw), c_out)])

    def model(self, inputs, outputs) -> onnx.ModelProto:
        return make_model(self.nodes, inputs, outputs, self.inits)


def prune_residual(c: int = 16, hw: int = 8) -> onnx.ModelProto:
    """stem -> two residual blocks (a projection skip, then an identity skip) -> GAP -> Flatten -> FC."""
    g = _PruneGraph(1)
    x = g.cbr("stem", "x", 3, c)
    a = g.cbr("b1a", x, c, c)
    a = g.bn("b1b.bn", g.conv("b1b", a, c, 2 * c), 2 * c)
    s = g.bn("b1s.bn", g.conv("b1s", x, c, 2 * c, k=1), 2 * c)
    y = g.op("Relu", "b1.relu", [g.op("Add", "b1.add", [a, s])])
    a = g.cbr("b2a", y, 2 * c, c)
    a = g.bn("b2b.bn", g.conv("b2b", a, c, 2 * c), 2 * c)
    y = g.op("Relu", "b2.relu", [g.op("Sum", "b2.sum", [a, y])])
    f = g.op("Flatten", "flat", [g.op("GlobalAveragePool", "gap", [y])], axis=1)
    g.op("Gemm", "fc", [f, g.w("fc.w", (10, 2 * c)), g.w("fc.b", (10,), 0.1)], transB=1)
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", [2, 3, hw, hw])], [tensor("y", [2, 10])])


def prune_concat_split(c: int = 16, hw: int = 8) -> onnx.ModelProto:
    """Two convs concatenated with the input image (whose 3 channels stay), then a conv; a conv
    split on channels into two branches (Split, and a Slice), each into its own conv."""
    g = _PruneGraph(2)
    a = g.cbr("ca", "x", 3, c)
    b = g.cbr("cb", "x", 3, c // 2)
    cat = g.op("Concat", "cat", [a, "x", b], axis=1)
    m = g.cbr("mix", cat, c + 3 + c // 2, 2 * c)
    p, q = g.op("Split", "split", [m, g.const("split.sizes", np.array([c, c], np.int64))], n_out=2, axis=1)
    p = g.cbr("p", p, c, c)
    q = g.cbr("q", q, c, c)
    sl = g.op("Slice", "slice", [m, g.const("sl.s", np.array([4], np.int64)), g.const("sl.e", np.array([12], np.int64)),
                                 g.const("sl.a", np.array([1], np.int64))])
    r = g.cbr("r", sl, 8, c)
    out = g.op("Concat", "cat2", [p, q, r], axis=1)
    g.conv("head", out, 3 * c, 4, k=1)
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", [2, 3, hw, hw])], [tensor("y", [2, 4, hw, hw])])


def prune_se_depthwise(c: int = 16, hw: int = 8, mult: int = 1) -> onnx.ModelProto:
    """MobileNet-style: 1x1 expand -> BN -> ReLU6 -> depthwise 3x3 (channel multiplier `mult`) ->
    BN -> ReLU6 -> squeeze-and-excitation (GAP -> 1x1 -> ReLU -> 1x1 -> Sigmoid -> Mul) -> 1x1
    project -> BN, plus a residual; then a head conv."""
    g = _PruneGraph(3)
    stem = g.cbr("stem", "x", 3, c)
    e = g.bn("expand.bn", g.conv("expand", stem, c, 2 * c, k=1), 2 * c)
    e = g.op("Clip", "expand.relu6", [e, g.const("zero", np.float32(0)), g.const("six", np.float32(6))])
    d = g.bn("dw.bn", g.conv("dw", e, 2 * c, 2 * c * mult, group=2 * c), 2 * c * mult)
    d = g.op("Clip", "dw.relu6", [d, "zero", "six"])
    s = g.op("GlobalAveragePool", "se.gap", [d])
    s = g.op("Relu", "se.relu", [g.conv("se.fc1", s, 2 * c * mult, c // 2, k=1)])
    s = g.op("Sigmoid", "se.sigmoid", [g.conv("se.fc2", s, c // 2, 2 * c * mult, k=1)])
    d = g.op("Mul", "se.mul", [d, s])
    p = g.bn("project.bn", g.conv("project", d, 2 * c * mult, c, k=1), c)
    y = g.op("Add", "res.add", [p, stem])
    g.conv("head", y, c, 4, k=1)
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", [2, 3, hw, hw])], [tensor("y", [2, 4, hw, hw])])


def prune_decoder(c: int = 16, hw: int = 8) -> onnx.ModelProto:
    """An autoencoder's decoder: conv -> ConvTranspose (stride 2) -> ReLU -> Resize -> Pad ->
    ConvTranspose -> output (its channels stay)."""
    g = _PruneGraph(4)
    h = g.cbr("enc", "x", 3, c)
    t = g.op("ConvTranspose", "up1", [h, g.w("up1.w", (c, 2 * c, 2, 2)), g.w("up1.b", (2 * c,), 0.1)],
             kernel_shape=[2, 2], strides=[2, 2])
    t = g.op("Relu", "up1.relu", [t])
    t = g.op("Resize", "resize", [t, "", g.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    t = g.op("Pad", "pad", [t, g.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="reflect")
    g.op("ConvTranspose", "up2", [t, g.w("up2.w", (2 * c, 3, 3, 3)), g.w("up2.b", (3,), 0.1)], kernel_shape=[3, 3])
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", [2, 3, hw, hw])], [tensor("y", [2, 3, None, None])])


def prune_flatten_gemm(c: int = 8, hw: int = 4) -> onnx.ModelProto:
    """conv -> ReLU -> Flatten (channel x spatial blocks) -> Gemm (transB=0) -> ReLU -> Gemm."""
    g = _PruneGraph(5)
    h = g.cbr("conv", "x", 3, c)
    f = g.op("Flatten", "flat", [h], axis=1)
    f = g.op("Relu", "fc1.relu", [g.op("Gemm", "fc1", [f, g.w("fc1.w", (c * hw * hw, 32)), g.w("fc1.b", (32,), 0.1)])])
    g.op("Gemm", "fc2", [f, g.w("fc2.w", (10, 32)), g.w("fc2.b", (10,), 0.1)], transB=1)
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", ["N", 3, hw, hw])], [tensor("y", ["N", 10])])


def prune_matmul_seq(h: int = 16, f: int = 64) -> onnx.ModelProto:
    """A transformer MLP on [batch, seq, hidden]: MatMul + Add -> GELU (Erf form) -> MatMul + Add."""
    g = _PruneGraph(6)
    a = g.op("Add", "fc1.add", [g.op("MatMul", "fc1", ["x", g.w("fc1.w", (h, f), 0.3)]), g.w("fc1.b", (f,), 0.1)])
    e = g.op("Erf", "gelu.erf", [g.op("Div", "gelu.div", [a, g.const("sqrt2", np.float32(np.sqrt(2)))])])
    e = g.op("Mul", "gelu.half", [g.op("Mul", "gelu.mul", [a, g.op("Add", "gelu.one", [e, g.const("one", np.float32(1))])]),
                                  g.const("half", np.float32(0.5))])
    g.op("Add", "fc2.add", [g.op("MatMul", "fc2", [e, g.w("fc2.w", (f, h), 0.3)]), g.w("fc2.b", (h,), 0.1)])
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", [2, 5, h])], [tensor("y", [2, 5, h])])


def prune_untraceable(c: int = 8, hw: int = 4) -> onnx.ModelProto:
    """Channels the tracer must leave alone: a Reshape that splits the channel axis, a Gather on
    it, a Sigmoid (f(0) != 0) before a conv, and a plain conv chain that can be pruned."""
    g = _PruneGraph(7)
    a = g.cbr("a", "x", 3, c)
    r = g.op("Reshape", "reshape", [a, g.const("shape", np.array([2, 2, c // 2, hw, hw], np.int64))])
    b = g.cbr("b", "x", 3, c)
    gth = g.op("Gather", "gather", [b, g.const("idx", np.array([0, 2, 1], np.int64))], axis=1)
    s = g.op("Sigmoid", "sig", [g.conv("c", "x", 3, c)])
    d = g.conv("d", s, c, c)
    ok = g.cbr("e", "x", 3, c)
    ok = g.conv("f", ok, c, 4)
    for n, name in zip(g.nodes[-1:], ["y4"]):
        n.output[0] = name
    return g.model([tensor("x", [2, 3, hw, hw])], [tensor(r, [2, 2, c // 2, hw, hw]), tensor(gth, [2, 3, hw, hw]),
                                                  tensor(d, [2, c, hw, hw]), tensor("y4", [2, 4, hw, hw])])


def prune_dead_channels(c: int = 16, hw: int = 8, dead=(1, 5, 6, 11)) -> onnx.ModelProto:
    """conv -> ReLU -> conv -> ReLU -> conv, where the first conv's channels `dead` have a bias of
    -100 and so never activate on inputs of normal size."""
    g = _PruneGraph(8)
    h = g.conv("c1", "x", 3, c)
    b = next(t for t in g.inits if t.name == "c1.b")
    v = numpy_helper.to_array(b).copy()
    v[list(dead)] = -100.0
    b.CopyFrom(init("c1.b", v))
    h = g.op("Relu", "c1.relu", [h])
    h = g.op("Relu", "c2.relu", [g.conv("c2", h, c, c)])
    g.conv("c3", h, c, 4)
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", [2, 3, hw, hw])], [tensor("y", [2, 4, hw, hw])])


def prune_concat_add(hw: int = 6) -> onnx.ModelProto:
    """Concat(conv a: 2 channels, conv b: 6) + conv c: 8 channels, then a head conv: a, b and c
    are one group, and a must keep a channel however high the ratio."""
    g = _PruneGraph(9)
    a = g.conv("a", "x", 3, 2)
    b = g.conv("b", "x", 3, 6)
    c = g.conv("c", "x", 3, 8)
    y = g.op("Relu", "relu", [g.op("Add", "add", [g.op("Concat", "cat", [a, b], axis=1), c])])
    g.conv("head", y, 8, 4, k=1)
    g.nodes[-1].output[0] = "y"
    return g.model([tensor("x", [2, 3, hw, hw])], [tensor("y", [2, 4, hw, hw])])


def fp16_conv_model(seed: int = 0) -> onnx.ModelProto:
    """float16 throughout: x -> Conv 3x3 (bias) -> Relu -> Conv 1x1 (no bias) -> y."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float16)
    b = (rng.standard_normal(32) * 0.1).astype(np.float16)
    w2 = (rng.standard_normal((24, 32, 1, 1)) * 0.2).astype(np.float16)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["h2"], name="relu"),
             helper.make_node("Conv", ["h2", "w2"], ["y"], name="pw", kernel_shape=[1, 1])]
    return make_model(nodes, [tensor("x", [2, 16, 12, 12], TensorProto.FLOAT16)],
                      [tensor("y", [2, 24, 12, 12], TensorProto.FLOAT16)], [init("w", w), init("b", b), init("w2", w2)])


def fp16_fc_model(seed: int = 0) -> onnx.ModelProto:
    """float16 throughout: x -> Gemm (bias, beta 0.5) -> MatMul -> y."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 48)) * 0.1).astype(np.float16)
    b = (rng.standard_normal(48) * 0.1).astype(np.float16)
    w2 = (rng.standard_normal((48, 40)) * 0.1).astype(np.float16)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", beta=0.5),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm")]
    return make_model(nodes, [tensor("x", [4, 64], TensorProto.FLOAT16)], [tensor("y", [4, 40], TensorProto.FLOAT16)],
                      [init("w", w), init("b", b), init("w2", w2)])


def float_types(model: onnx.ModelProto) -> set[int]:
    """Element types of every initializer, graph input and output (TensorProto enums)."""
    types = {t.data_type for t in model.graph.initializer}
    types |= {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    return types


def _with_nodes(model: onnx.ModelProto, nodes: list) -> onnx.ModelProto:
    """`model` (edited in place) with `nodes` as its graph and the initializers they read."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def biases_as_adds(model: onnx.ModelProto, shape=lambda c: (1, c, 1, 1)) -> onnx.ModelProto:
    """`model` with every Conv's bias moved into an Add after it, the form paddle2onnx and some
    TensorFlow converters export (the same function). A `shape` of fewer values than channels
    keeps the first ones (a different function: `shape=lambda c: (1,)` adds b[0] everywhere)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = []
    for n in out.graph.node:
        if n.op_type != "Conv" or len(n.input) < 3 or not n.input[2]:
            nodes.append(n)
            continue
        b = numpy_helper.to_array(inits[n.input[2]])
        want = shape(b.size)
        out.graph.initializer.append(init(f"{n.name}_add_bias", b.reshape(want) if np.prod(want) == b.size
                                          else np.resize(b, want)))
        conv = onnx.NodeProto()
        conv.CopyFrom(n)
        del conv.input[2]
        conv.output[0] = f"{n.output[0]}_no_bias"
        nodes += [conv, helper.make_node("Add", [conv.output[0], f"{n.name}_add_bias"], [n.output[0]],
                                         name=f"{n.name}_add")]
    return _with_nodes(out, nodes)


def batchnorms_as_mul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every inference-mode BatchNormalization written as x * a + (beta - mean * a),
    a = gamma / sqrt(var + eps), as Mul and Add by per-channel (1, C, 1, ...) constants: the form
    torchvision's FrozenBatchNorm2d (detection backbones) exports to (the same function)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    nodes = []
    for n in out.graph.node:
        if n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        gamma, beta, mean, var = (inits[i].astype(np.float64) for i in n.input[1:5])
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        a = gamma / np.sqrt(var + eps)
        shape = (1, a.size, 1, 1)
        out.graph.initializer.extend([init(f"{n.name}_scale", a.reshape(shape).astype(np.float32)),
                                      init(f"{n.name}_shift", (beta - mean * a).reshape(shape).astype(np.float32))])
        nodes += [helper.make_node("Mul", [n.input[0], f"{n.name}_scale"], [f"{n.output[0]}_scaled"], name=f"{n.name}_mul"),
                  helper.make_node("Add", [f"{n.output[0]}_scaled", f"{n.name}_shift"], [n.output[0]],
                                   name=f"{n.name}_add")]
    return _with_nodes(out, nodes)


def gemms_as_matmul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every Gemm (alpha = beta = 1, no transA) written as MatMul(x, W) + Add(b), the
    form tf2onnx gives a Dense layer and torch a Linear on more than two axes (the same function)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = []
    for n in out.graph.node:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if any(a.name == "transB" and a.i for a in n.attribute):
            w = w.T
        out.graph.initializer.append(init(f"{n.name}_matmul_w", np.ascontiguousarray(w)))
        nodes += [helper.make_node("MatMul", [n.input[0], f"{n.name}_matmul_w"], [f"{n.output[0]}_mm"], name=n.name),
                  helper.make_node("Add", [f"{n.output[0]}_mm", n.input[2]], [n.output[0]], name=f"{n.name}_add")]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
