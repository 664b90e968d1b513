"""surgeon.rewrite: the graph plumbing plugins share."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from surgeon.model import to_graph, to_model
from surgeon.rewrite import constant_value, replace_constant
from tests.models import checked, conv_model, init, make_model, random_feeds, run, tensor


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
