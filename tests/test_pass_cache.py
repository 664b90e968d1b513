"""Sequential passes that start from the activations of the last pass (surgeon.pass_cache)."""

import numpy as np
import pytest

import surgeon
from surgeon.calibration import DataSet
from surgeon.model import to_graph
from surgeon.pass_cache import PassRunner, downstream
from tests.models import detector_model


def _data(model, samples=4):
    x = np.random.default_rng(0).standard_normal((samples, 3, 16, 16)).astype(np.float32)
    return DataSet({"images": x}, source="random", batch=1)


def _scale(graph, node_name, factor):
    """A stand-in for a rewrite: the node computes something else from now on."""
    node = next(n for n in graph.nodes if n.name == node_name)
    node.inputs[1].values = node.inputs[1].values * factor


def _run(runner, graph, names, data, changing):
    out = {t: [] for t in names}
    for values in runner.stream(graph, names, data, changing=changing, batch=8):
        for t in names:
            out[t].append(values[t])
    return {t: np.concatenate(v) for t, v in out.items()}


def test_downstream_follows_every_reader():
    graph = to_graph(detector_model())
    d = downstream(graph, ["f"])
    assert {"f", "res", "up", "n", "n_r", "nhwc", "out"} <= d
    assert not d & {"s", "s_r", "a", "b", "cat"}


def test_each_pass_starts_after_what_was_rewritten_and_matches_a_run_from_the_inputs():
    model = detector_model()
    data = _data(model)
    graph = to_graph(model)
    cached, fresh = PassRunner(), PassRunner(limit=0)
    stages = [(["s_r"], ["a", "b", "f", "n"], "branch_a"),  # names, outputs that may change, then rewrite
              (["cat"], ["f", "n"], "fuse"),
              (["up"], ["n"], None)]
    cuts = []
    for names, changing, rewrite in stages:
        got = _run(cached, graph, names, data, changing)
        want = _run(fresh, graph, names, data, changing)
        for t in names:
            np.testing.assert_allclose(got[t], want[t], rtol=1e-5, atol=1e-6)
        cuts.append(list(cached.started_from))
        assert fresh.started_from == [] and fresh.cache == {}
        if rewrite:
            _scale(graph, rewrite, 0.5)
    # pass 1 runs from the images; pass 2 from the stem's output (branch_a changed what follows
    # it); pass 3 from the Concat and the residual's other input (fuse changed what follows it)
    assert cuts == [[], ["s_r"], ["cat", "s_r"]]


def test_a_cache_over_the_limit_keeps_nothing_and_the_next_pass_runs_from_the_inputs():
    model = detector_model()
    data = _data(model)
    graph = to_graph(model)
    runner = PassRunner(limit=1000)  # bytes: less than one activation
    _run(runner, graph, ["s_r"], data, ["a"])
    assert runner.cache == {}
    _run(runner, graph, ["cat"], data, [])
    assert runner.started_from == []


def test_a_kept_tensor_a_pass_does_not_read_waits_for_the_pass_that_does():
    """The residual Add reads the stem's output long after the stem: pass 2 (fuse) does not read
    it, pass 3 (the Add) does. It stays in the cache through pass 2, so pass 3 starts from it
    instead of running the stem again; a limit too small for it drops it."""
    model = detector_model()
    data = _data(model)
    graph = to_graph(model)
    for limit, want_cut in ((1 << 30, ["cat", "s_r"]), (None, ["cat"])):
        cached, fresh = PassRunner(), PassRunner(limit=0)
        cuts = []
        for names, changing in ((["cat"], []), (["f"], ["f"]), (["res"], [])):
            if limit is None and names == ["f"]:  # room for what pass 2 reads, not for the stem's output
                cached.limit = cached.cache["cat"].nbytes
            got = _run(cached, graph, names, data, changing)
            want = _run(fresh, graph, names, data, changing)
            for t in names:
                np.testing.assert_allclose(got[t], want[t], rtol=1e-5, atol=1e-6)
            cuts.append(list(cached.started_from))
            if names == ["f"]:
                assert ("s_r" in cached.cache) == (limit is not None) and "s_r" not in cached.started_from
        assert cuts[2] == want_cut, cuts


_original_init = PassRunner.__init__


def _uncached(self, limit=0, **kw):
    """PassRunner.__init__ with nothing kept between passes."""
    _original_init(self, limit=0, **kw)


@pytest.mark.parametrize("passes", [2, 12])
def test_tucker_data_fit_is_the_same_with_and_without_the_pass_cache(monkeypatch, passes):
    model = detector_model(c=8)
    data = _data(model, samples=8)
    opts = {"ratio": 0.5, "guard": "none", "passes": passes, "samples": 8}
    cuts = []
    stream = PassRunner.stream

    def spy(self, *args, **kwargs):
        yield from stream(self, *args, **kwargs)
        cuts.append(list(self.started_from))

    monkeypatch.setattr(PassRunner, "stream", spy)
    with_cache = surgeon.apply(model, "tucker", opts, data=data)
    assert any(cuts) == (passes > 2)  # with 2 stages the first holds the stem: nothing upstream to keep
    monkeypatch.setattr(PassRunner, "stream", stream)
    monkeypatch.setattr(PassRunner, "__init__", _uncached)
    without = surgeon.apply(model, "tucker", opts, data=data)
    a = {l.layer: l.details for l in with_cache.rewritten}
    b = {l.layer: l.details for l in without.rewritten}
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name]["fit_choice"] == b[name]["fit_choice"]
        assert a[name]["out_error"] == pytest.approx(b[name]["out_error"], rel=1e-4, abs=1e-6)



def test_the_outputs_of_a_split_are_not_cut_at():
    """Detaching one output of a multi-output node would renumber the others: such tensors are
    recomputed, and the values still match a run from the inputs."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = lambda name, *shape: helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).ravel())
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="c0", kernel_shape=[1, 1]),
             helper.make_node("Split", ["c", "sizes"], ["s0", "s1"], name="split", axis=1),
             helper.make_node("Conv", ["s0", "wa"], ["a"], name="ca", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["s1", "wb"], ["b"], name="cb", kernel_shape=[1, 1]),
             helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1)]
    inits = [w("w0", 8, 3, 1, 1), w("wa", 4, 4, 1, 1), w("wb", 4, 4, 1, 1),
             helper.make_tensor("sizes", TensorProto.INT64, [2], [4, 4])]
    model = helper.make_model(helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", 1, [1, 3, 5, 5])],
                                                [helper.make_tensor_value_info("y", 1, [1, 8, 5, 5])], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    data = DataSet({"x": rng.standard_normal((3, 3, 5, 5)).astype(np.float32)}, source="random", batch=1)
    graph = to_graph(model)
    cached, fresh = PassRunner(), PassRunner(limit=0)
    for names, changing in ((["s0", "s1"], ["a", "b"]), (["y"], [])):
        got, want = _run(cached, graph, names, data, changing), _run(fresh, graph, names, data, changing)
        for t in names:
            np.testing.assert_allclose(got[t], want[t], rtol=1e-5, atol=1e-6)
    assert cached.started_from == []  # s0 and s1 were kept by the first pass, but not cut at


def test_large_weights_reach_the_pass_session_in_memory_not_through_the_proto(monkeypatch):
    """A pass exports its part of the graph with the constants of DETACH_BYTES or more as
    external data and hands their values to the session (VGG-19: 548 MB copied four times per
    pass); its values are those of a run with the weights in the proto, and the graph the caller
    keeps still holds its weights."""
    import importlib

    import onnx
    from onnx import TensorProto, helper

    from surgeon import model as model_mod
    from tests.models import init, make_model

    validate = importlib.import_module("surgeon.validate")  # the module (surgeon.validate is also a function)

    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((600, 600)).astype(np.float32)  # 1.4 MB: detached
    w2 = rng.standard_normal((600, 10)).astype(np.float32)   # 24 kB: stays in the proto
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 600])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], [init("w1", w1), init("w2", w2)])
    data = DataSet({"x": rng.standard_normal((6, 600)).astype(np.float32)}, source="random")
    seen = []
    real = validate.session

    def spy(model, *args, **kwargs):
        seen.append((model, kwargs.get("initializers") or {}))
        return real(model, *args, **kwargs)
    monkeypatch.setattr(validate, "session", spy)
    graph = to_graph(m)
    got = _run(PassRunner(), graph, ["h", "y"], data, changing=[])
    (proto, given), = seen
    stored = {t.name: t for t in proto.graph.initializer}
    assert set(given) == {"w1"} and stored["w1"].data_location == onnx.TensorProto.EXTERNAL
    assert not stored["w1"].raw_data and stored["w2"].raw_data
    np.testing.assert_array_equal(given["w1"], w1)
    x = data.inputs["x"]
    np.testing.assert_allclose(got["h"], x @ w1, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["y"], np.maximum(x @ w1, 0) @ w2, rtol=1e-5, atol=1e-3)
    # the caller's graph keeps its weights
    assert np.array_equal(next(t for t in graph.tensors().values() if t.name == "w1").values, w1)
    assert model_mod.DETACH_BYTES <= w1.nbytes


def test_a_constant_of_a_type_onnxruntime_takes_only_from_the_proto_stays_there():
    """bfloat16 (ml_dtypes) weights: onnxruntime takes numpy's own types in memory, so
    detach_large leaves them in the proto; a float32 one of the same size goes."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import onnx_graphsurgeon as gs

    from surgeon.model import detach_large

    big = np.ones((600, 600), np.float32)
    x = gs.Variable("x", np.float32, (1, 600))
    graph = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, gs.Constant("plain", big)], outputs=[gs.Variable("a", np.float32)]),
                            gs.Node("Identity", inputs=[gs.Constant("half", np.ones((1000, 1000), ml_dtypes.bfloat16))],
                                    outputs=[gs.Variable("b")])],
                     inputs=[x])
    assert set(detach_large(graph)) == {"plain"}
