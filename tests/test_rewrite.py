"""surgeon.rewrite: the graph plumbing plugins share."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from surgeon.model import to_graph, to_model
import pytest

from surgeon.rewrite import bias_add_after, constant_value, fold_affine_after, fold_bias_add, replace_constant
import surgeon
from tests.models import (CNN, batchnorms_as_mul_add, biases_as_adds, checked, conv_model, init, make_model, random_feeds, run,
                          tensor)


def _node(graph: gs.Graph, name: str) -> gs.Node:
    return next(n for n in graph.nodes if n.name == name)


def test_replace_constant_names_the_new_constant_after_the_node_and_drops_the_old_one():
    model = conv_model(bias=True)
    graph = to_graph(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    old_name = conv.inputs[1].name
    w = constant_value(conv.inputs[1])
    const = replace_constant(graph, conv, 1, "test", "weight", 2 * w)
    assert const.name == f"{conv.name}/test/weight" and conv.inputs[1] is const
    # a second edit by the same pass updates that constant instead of adding `weight_1`
    assert replace_constant(graph, conv, 1, "test", "weight", 3 * w) is const
    np.testing.assert_array_equal(constant_value(conv.inputs[1]), 3 * w)
    out = checked(to_model(graph, like=model))
    names = {t.name for t in out.graph.initializer}
    assert f"{conv.name}/test/weight" in names and old_name not in names


def test_replace_constant_fills_an_omitted_input_and_leaves_a_shared_constant_alone():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="g1"),
             helper.make_node("Gemm", ["h", "w"], ["y"], name="g2")]
    model = make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 4])], [init("w", w)])
    graph = to_graph(model)
    g1, g2 = _node(graph, "g1"), _node(graph, "g2")
    replace_constant(graph, g1, 2, "test", "bias", np.ones(4, np.float32))  # Gemm's C was omitted
    replace_constant(graph, g1, 1, "test", "weight", 2 * w)
    assert len(g1.inputs) == 3 and constant_value(g1.inputs[2]).tolist() == [1.0] * 4
    assert g2.inputs[1].name == "w"  # still read by g2: not renamed, not changed
    np.testing.assert_array_equal(constant_value(g2.inputs[1]), w)
    x = random_feeds(model)["x"]
    out = checked(to_model(graph, like=model))
    expected = ((x @ (2 * w) + 1) @ w)
    np.testing.assert_allclose(run(out, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 32, 1, 1), (32, 1, 1), (1,)], ids=["1xCx1x1", "Cx1x1", "one value"])
def test_a_bias_add_after_a_conv_folds_into_its_bias_exactly(shape):
    model = biases_as_adds(conv_model(bias=True, relu=False), shape=lambda c: shape)
    graph = to_graph(model)
    conv = _node(graph, "conv")
    assert fold_bias_add(graph, conv, "test") == "conv_add"
    out = checked(to_model(graph, like=model))
    assert [n.op_type for n in out.graph.node] == ["Conv"] and out.graph.output[0].name == "y"
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_an_add_that_is_not_a_per_channel_bias_is_left_alone():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    cases = {
        "per position": rng.standard_normal((1, 4, 6, 6)).astype(np.float32),  # varies over space
        "wrong length": rng.standard_normal((1, 2, 1, 1)).astype(np.float32),
        "integer": np.ones((1, 4, 1, 1), np.int64),
    }
    for why, value in cases.items():
        nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
                 helper.make_node("Add", ["h", "c"], ["y"], name="add")]
        model = make_model(nodes, [tensor("x", [2, 3, 6, 6])], [tensor("y", [2, 4, 6, 6])],
                           [init("w", w), init("c", value)])
        graph = to_graph(model)
        assert bias_add_after(graph, _node(graph, "conv")) is None, why
    # the conv's output read by a second node too: the Add is not its bias alone
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["h", "c"], ["y"], name="add"), helper.make_node("Relu", ["h"], ["z"], name="r")]
    model = make_model(nodes, [tensor("x", [2, 3, 6, 6])], [tensor("y", [2, 4, 6, 6]), tensor("z", [2, 4, 6, 6])],
                       [init("w", w), init("c", np.ones((1, 4, 1, 1), np.float32))])
    graph = to_graph(model)
    assert fold_bias_add(graph, _node(graph, "conv"), "test") is None


def _affine_tail_model(tail: list[str], *, matmul: bool = False):
    """x -> Conv (or a 2-D MatMul) -> the named per-channel ops -> Relu, constants seeded."""
    rng = np.random.default_rng(1)
    c = 4
    w = rng.standard_normal((3, c) if matmul else (c, 3, 3, 3)).astype(np.float32)
    shape = (1, c) if matmul else (1, c, 1, 1)
    inits = [init("w", w)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t0"], name="layer") if matmul else
             helper.make_node("Conv", ["x", "w"], ["t0"], name="layer", pads=[1, 1, 1, 1])]
    for k, op in enumerate(tail, 1):
        if op == "BatchNormalization":
            names = [f"{p}{k}" for p in ("gamma", "beta", "mean", "var")]
            inits += [init(n, v.astype(np.float32)) for n, v in zip(names, (
                rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)))]
            nodes.append(helper.make_node(op, [f"t{k - 1}", *names], [f"t{k}"], name=f"{op.lower()}{k}"))
        else:
            value = rng.uniform(-2, 2, shape) if op == "Mul" else rng.standard_normal(shape)
            inits.append(init(f"c{k}", value.astype(np.float32)))
            nodes.append(helper.make_node(op, [f"t{k - 1}", f"c{k}"], [f"t{k}"], name=f"{op.lower()}{k}"))
    nodes.append(helper.make_node("Relu", [f"t{len(tail)}"], ["y"], name="relu"))
    x, y = ([5, 3], [5, c]) if matmul else ([2, 3, 6, 6], [2, c, 6, 6])
    return make_model(nodes, [tensor("x", x)], [tensor("y", y)], inits)


@pytest.mark.parametrize("tail", [["Mul", "Add"], ["Add", "BatchNormalization"], ["BatchNormalization", "Mul"],
                                  ["Mul", "Mul", "Add", "Add"]], ids="-".join)
def test_a_layers_affine_tail_folds_into_it_exactly_up_to_the_relu(tail):
    """Conv -> Mul -> Add is torchvision's FrozenBatchNorm2d exported; any per-channel chain of
    Add, Mul and BatchNormalization after the layer folds, one after another."""
    model = _affine_tail_model(tail)
    graph = to_graph(model)
    folded = fold_affine_after(graph, _node(graph, "layer"), "test")
    assert folded == [f"{op.lower()}{k}" for k, op in enumerate(tail, 1)]
    out = checked(to_model(graph, like=model))
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_without_scales_only_bias_adds_fold_and_a_matmul_with_its_add_becomes_a_gemm():
    model = _affine_tail_model(["Mul", "Add"])
    graph = to_graph(model)
    assert fold_affine_after(graph, _node(graph, "layer"), "test", scales=False) == []
    model = _affine_tail_model(["Add", "Mul"])
    graph = to_graph(model)
    assert fold_affine_after(graph, _node(graph, "layer"), "test", scales=False) == ["add1"]
    mm = _affine_tail_model(["Mul", "Add"], matmul=True)
    graph = to_graph(mm)
    assert fold_affine_after(graph, _node(graph, "layer"), "test") == []  # the input's rank is not known
    assert fold_affine_after(graph, _node(graph, "layer"), "test", input_rank=2) == ["mul1", "add2"]
    out = checked(to_model(graph, like=mm))
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Relu"]
    feeds = random_feeds(mm)
    np.testing.assert_allclose(run(out, feeds)[0], run(mm, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_mul_that_is_not_a_per_channel_scale_is_left_alone():
    """SiLU's Mul(x, Sigmoid(x)) reads a computed tensor; a Mul varying over space is no scale."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["h", "c"], ["y"], name="mul")]
    model = make_model(nodes, [tensor("x", [2, 3, 6, 6])], [tensor("y", [2, 4, 6, 6])],
                       [init("w", w), init("c", rng.standard_normal((1, 4, 6, 6)).astype(np.float32))])
    graph = to_graph(model)
    assert fold_affine_after(graph, _node(graph, "conv"), "test") == []
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["h"], ["s"], name="sig"), helper.make_node("Mul", ["h", "s"], ["y"], name="mul")]
    model = make_model(nodes, [tensor("x", [2, 3, 6, 6])], [tensor("y", [2, 4, 6, 6])], [init("w", w)])
    graph = to_graph(model)
    assert fold_affine_after(graph, _node(graph, "conv"), "test") == []


def test_the_frozen_batchnorm_form_of_the_cnn_folds_back_to_the_same_function():
    m = surgeon.load(CNN)
    split = batchnorms_as_mul_add(m)
    graph = to_graph(split)
    folded = [name for n in list(graph.nodes) if n.op == "Conv" for name in fold_affine_after(graph, n, "test")]
    assert folded == [f"bn{k}_{op}" for k in range(1, 6) for op in ("mul", "add")]
    out = checked(to_model(graph, like=split))
    assert {"Mul", "Add", "BatchNormalization"}.isdisjoint(n.op_type for n in out.graph.node)
    feeds = random_feeds(m)
    np.testing.assert_allclose(run(out, feeds)[0], run(m, feeds)[0], rtol=1e-4, atol=1e-4)
