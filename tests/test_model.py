"""Loading, checking, folding and atomic saving."""

import os

import numpy as np
import onnx
import pytest
from onnx import helper

from surgeon import model as model_io, zoo
from surgeon.errors import ModelError, UsageError
from tests.models import CNN, conv_model, make_model, random_feeds, run, tensor


def test_load_sample_model():
    m = model_io.load(CNN)
    assert [i.name for i in m.graph.input] == ["input"]


@pytest.mark.parametrize("content,match", [
    (b"", "no graph|not a readable"),
    (b"definitely not onnx", "not a readable ONNX model"),
])
def test_garbage_files_give_model_error(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelError, match=match):
        model_io.load(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "trunc.onnx"
    p.write_bytes(CNN.read_bytes()[:50_000])
    with pytest.raises(ModelError):
        model_io.load(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        model_io.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a directory"):
        model_io.load(tmp_path)


def test_checker_failure_is_reported(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    m = make_model([node], [tensor("x", [1])], [tensor("y", [1])])
    m.graph.node[0].input[0] = "undefined_tensor"
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        model_io.load(p)


def test_missing_external_data(tmp_path):
    m = conv_model(c=64, f=64)
    p = tmp_path / "ext.onnx"
    onnx.save(m, p, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(ModelError):
        model_io.load(p)


def test_save_is_atomic_and_deterministic(tmp_path):
    m = model_io.load(CNN)
    a = model_io.save(m, tmp_path / "a.onnx")
    b = model_io.save(m, tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temp files left


def test_save_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(CNN.read_bytes())
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        model_io.save(model_io.load(src), src, protect=(src,))
    assert src.read_bytes() == CNN.read_bytes()


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    m = model_io.load(CNN)
    target = tmp_path / "out.onnx"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        model_io.save(m, target)
    assert list(tmp_path.iterdir()) == []


def test_save_with_external_data_round_trips(tmp_path):
    m = model_io.load(CNN)
    p = model_io.save(m, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    assert p.stat().st_size < 100_000
    # onnx >= 1.2x made the data file owner-only: others could read the model but not its weights
    assert (tmp_path / "ext.onnx.data").stat().st_mode & 0o777 == p.stat().st_mode & 0o777
    back = model_io.load(p)
    feeds = random_feeds(m)
    np.testing.assert_array_equal(run(m, feeds)[0], run(back, feeds)[0])


def test_fold_constants_turns_constant_nodes_into_initializers():
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
        helper.make_node("Constant", [], ["shape"], value=onnx.numpy_helper.from_array(np.array([3], np.int64))),
        helper.make_node("ConstantOfShape", ["shape"], ["b"], value=onnx.numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc"),
    ]
    m = make_model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 3])])
    folded = model_io.fold_constants(m)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert {t.name for t in folded.graph.initializer} == {"w", "b"}
    feeds = random_feeds(m)
    np.testing.assert_allclose(run(m, feeds)[0], run(folded, feeds)[0], rtol=1e-6)


BIG_FC = {"vgg19", "zfnet512", "bvlc_alexnet"}  # 100M+ parameter FC layers: seconds each to materialize


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG_FC else n
                                  for n in zoo.available()])
def test_zoo_models_fold_and_run(name):
    """Every light zoo model: ConstantOfShape weights become initializers; the model runs."""
    m = zoo.load(name)
    ops = {n.op_type for n in m.graph.node}
    assert "ConstantOfShape" not in ops
    assert len(m.graph.input) == 1  # ir 3 style initializer-inputs are gone
    onnx.checker.check_model(m, full_check=True)
    out = run(m, random_feeds(m, samples=1))[0]
    assert np.isfinite(out).all()


def test_materialized_weights_are_not_constant():
    m = zoo.load("squeezenet")
    convw = next(t for t in m.graph.initializer if len(t.dims) == 4)
    w = onnx.numpy_helper.to_array(convw)
    assert w.std() > 0.01
    assert np.array_equal(w, onnx.numpy_helper.to_array(next(
        t for t in zoo.load("squeezenet").graph.initializer if t.name == convw.name)))  # seeded


def test_unnamed_nodes_get_stable_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),
             helper.make_node("Neg", ["b"], ["y"])]
    m = make_model(nodes, [tensor("x", [2])], [tensor("y", [2])])
    names = [n.name for n in model_io.fold_constants(m).graph.node]
    assert names == ["Relu_1", "Relu_0", "Neg_0"]


def test_signature_of_a_sequence_input_says_it_is_not_a_tensor():
    from onnx import TensorProto, helper
    from surgeon.model import input_signature
    from tests.models import make_model, tensor
    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [1, 4])
    m = make_model([helper.make_node("ConcatFromSequence", ["xs"], ["y"], axis=0)], [seq], [tensor("y", None)])
    assert input_signature(m) == [("xs", [], np.dtype(object))]


def test_batchnorm_statistics_from_data_normalize_every_layer():
    """After set_batchnorm_statistics each BatchNormalization output has, on that data, the
    per-channel mean beta and standard deviation gamma (its input statistics are measured in
    graph order, so the second BN sees the first one already normalized). The input model is
    left as it was."""
    from surgeon.calibration import DataSet
    from surgeon.validate import stream_tensors
    from tests.models import prune_residual
    m = prune_residual()
    before = m.SerializeToString()
    data = DataSet({"x": np.random.default_rng(3).standard_normal((6, 3, 8, 8)).astype(np.float32) * 5 + 2}, batch=2)
    out = zoo.set_batchnorm_statistics(m, data)
    assert m.SerializeToString() == before
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    bns = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) >= 2
    got = {k: np.concatenate([b[k] for b in stream_tensors(out, [n.output[0] for n in bns], data, batch=2)])
           for k in [n.output[0] for n in bns]}
    for n in bns:
        y = got[n.output[0]].astype(np.float64)
        np.testing.assert_allclose(y.mean((0, 2, 3)), inits[n.input[2]], atol=2e-4)
        eps = n.attribute[0].f if n.attribute else 1e-5
        var = inits[n.input[4]].astype(np.float64)
        np.testing.assert_allclose(y.std((0, 2, 3)), np.abs(inits[n.input[1]]) * np.sqrt(var / (var + eps)), rtol=2e-4)


def test_a_model_whose_only_fault_is_its_node_order_is_sorted(tmp_path, caplog):
    """onnxruntime's float16 converter (keep_io_types=True) appends its input Casts at the end:
    onnxruntime runs the model, and surgeon refused it as failing the checker."""
    import logging
    m = conv_model()
    m.graph.node.reverse()  # Relu before the Conv that feeds it
    p = tmp_path / "unsorted.onnx"
    onnx.save(m, p)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(onnx.load(p))
    before = p.read_bytes()
    with caplog.at_level(logging.WARNING):
        loaded = model_io.load(p)
    assert [n.op_type for n in loaded.graph.node] == ["Conv", "Relu"]
    assert "not in topological order" in caplog.text and p.read_bytes() == before
    feeds = random_feeds(conv_model())
    np.testing.assert_array_equal(run(loaded, feeds)[0], run(conv_model(), feeds)[0])


def test_checker_messages_are_one_line(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    m = make_model([node], [tensor("x", [1])], [tensor("y", [1])])
    m.graph.node[0].input[0] = "undefined_tensor"  # "... of node: \nname: ... \n is not output of any previous nodes."
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelError) as err:
        model_io.load(p)
    assert "\n" not in str(err.value) and "is not output of any previous nodes" in str(err.value)


def test_reports_and_plots_get_the_mode_open_gives(tmp_path):
    """mkstemp's owner-only files: every JSON report, recipe, CSV and PNG was 0600."""
    from surgeon import report
    from surgeon.atomic import plain_mode, replacing
    made = [report.write_text(tmp_path / "r.json", "{}\n"),
            report.plot(tmp_path / "p.png", [1, 2], {"a": [1.0, 2.0]}, xlabel="x", ylabel="y", title="t")]
    with open(tmp_path / "plain.txt", "w"):
        pass
    for p in made:
        assert p.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == plain_mode()
    with pytest.raises(RuntimeError):
        with replacing(tmp_path / "half.json"):
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "plain.txt", "r.json"]
    old = os.umask(0o027)  # a stricter umask is followed, not widened
    try:
        assert report.write_text(tmp_path / "strict.json", "{}\n").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
