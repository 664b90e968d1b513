"""Drift metrics and A/B latency measured with onnxruntime."""

import numpy as np
import onnx
import pytest

from surgeon import calibration, model as model_io
from surgeon.validate import drift_metrics, latency_ab, session, validate
from tests.models import CNN, CNN_TEST


def test_drift_metrics_on_known_arrays():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0]])  # second row's argmax flips
    m = drift_metrics(a, b)
    assert m["max_abs"] == 1.0 and m["mean_abs"] == 0.5
    assert m["rel_l2"] == pytest.approx(np.sqrt(2) / np.sqrt(2))
    assert m["cosine"] == pytest.approx(0.5)
    assert m["top1_agreement"] == 0.5


def test_identical_models_do_not_drift_and_accuracy_is_real():
    m = model_io.load(CNN)
    ds = calibration.load_data(CNN_TEST, m)
    v = validate(m, m, ds, repeats=5)
    out = v.outputs["logits"]
    assert out["max_abs"] == 0.0 and out["top1_agreement"] == 1.0
    assert v.accuracy["original"] == v.accuracy["candidate"] >= 0.97
    assert v.latency["original"]["runs"] == 5 and v.latency["speedup"] > 0


def test_perturbed_weights_are_seen_as_drift():
    m = model_io.load(CNN)
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    w = next(t for t in bad.graph.initializer if t.name == "fc2.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0] += 5.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    v = validate(m, bad, calibration.load_data(CNN_TEST, m), latency=False)
    assert v.worst_rel_l2 > 0.01
    assert v.top1_agreement < 1.0
    assert v.latency is None


def test_latency_is_interleaved_and_counted():
    m = model_io.load(CNN)
    s = session(m)
    feed = {"input": np.zeros((1, 1, 32, 32), np.float32)}
    a, b = latency_ab(s, s, feed, warmup=1, repeats=7)
    assert a.runs == b.runs == 7
    assert a.median_ms > 0 and a.p90_ms >= a.median_ms


# --- validation that cannot be fooled (issue 8) ----------------------------------------------------

def _scaled_output(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """`model` with its output multiplied by `scale` (nan -> all-NaN logits, 0 -> all zeros)."""
    from onnx import helper, numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [f"{o}__pre" if o == out else o for o in n.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), "__scale"))
    m.graph.node.append(helper.make_node("Mul", [f"{out}__pre", "__scale"], [out], name="__scale_out"))
    return m


def test_nan_outputs_are_flagged_and_fail_every_budget():
    """Issue 8: an all-NaN candidate passed --max-drift 0.05 (drift shown as nan, no budget failure)."""
    from surgeon import budgets
    m = model_io.load(CNN)
    ds = calibration.load_data(CNN_TEST, m).take(64)
    v = validate(m, _scaled_output(m, float("nan")), ds, latency=False)
    out = v.outputs["logits"]
    assert out["non_finite"] == 64 * 10 and out["non_finite_original"] == 0
    assert v.non_finite_outputs == ["logits"] and v.worst_rel_l2 == float("inf")
    assert v.top1_agreement == 0.0 and v.accuracy["candidate"] == 0.0
    b = budgets.Budgets(max_drift=0.05, min_agreement=0.5, min_accuracy=0.1)
    checks = budgets.evaluate(b, v.to_json(), size_bytes=None)
    assert [c.status for c in checks] == ["fail"] * 3
    assert all("NaN/Inf" in c.detail for c in checks)


def test_inf_is_caught_too():
    m = drift_metrics(np.ones((4, 3)), np.array([[1, 1, np.inf]] * 4, np.float32))
    assert m["non_finite"] == 4 and np.isnan(m["rel_l2"])


def test_constant_outputs_are_flagged_and_do_not_agree():
    """Issue 8: with constant or all-zero outputs top-1 agreement was reported as 100%."""
    m = model_io.load(CNN)
    ds = calibration.load_data(CNN_TEST, m).take(64)
    v = validate(m, _scaled_output(m, 0.0), ds, latency=False)
    out = v.outputs["logits"]
    assert out["constant"] and not out["constant_original"] and v.constant_outputs == ["logits"]
    assert out["top1_agreement"] == 0.0  # every candidate row is a 10-way tie: no prediction
    assert out["agreement_rows"] == 64


def test_agreement_counts_only_rows_with_a_unique_top1():
    ref = np.array([[3.0, 1.0], [2.0, 2.0], [0.0, 5.0], [1.0, 1.0]])  # rows 1 and 3 are ties
    out = np.array([[3.0, 1.0], [9.0, 0.0], [5.0, 0.0], [0.0, 9.0]])
    m = drift_metrics(ref, out)
    assert m["agreement_rows"] == 2 and m["top1_agreement"] == 0.5
    both_constant = drift_metrics(np.zeros((5, 4)), np.zeros((5, 4)))
    assert both_constant["agreement_rows"] == 0 and both_constant["top1_agreement"] is None
    assert both_constant["constant"] and both_constant["constant_original"]


def test_agreement_rows_reach_the_budget_report():
    from surgeon import budgets
    ref = np.array([[3.0, 1.0], [2.0, 2.0]] * 3)
    m = model_io.load(CNN)
    v = validate(m, m, calibration.load_data(CNN_TEST, m).take(8), latency=False).to_json()
    assert v["agreement_rows"] == 8 and v["non_finite_outputs"] == [] and v["constant_outputs"] == []
    checks = budgets.evaluate(budgets.Budgets(min_agreement=0.99), v, None)
    assert checks[0].status == "pass" and "over 8 rows" in checks[0].detail
    assert drift_metrics(ref, ref)["agreement_rows"] == 3


def test_latency_ratio_comes_with_its_interval():
    m = model_io.load(CNN)
    v = validate(m, m, calibration.load_data(CNN_TEST, m).take(4), repeats=12)
    lat = v.latency
    assert lat["ratio_low"] <= lat["ratio"] <= lat["ratio_high"]


def test_median_interval_is_the_order_statistic_interval():
    from surgeon.validate import median_interval
    med, lo, hi = median_interval(np.arange(1, 101, dtype=float))
    # n = 100: ranks 50 -+ 9.8 -> sorted[40], sorted[60] (0-based) = 41, 61
    assert (med, lo, hi) == (50.5, 41.0, 61.0)
    assert median_interval([2.0] * 3) == (2.0, 2.0, 2.0)


def test_fp16_models_validate_and_stream():
    from surgeon.validate import stream_tensors
    from tests.models import detector_model
    m = detector_model(dtype=np.float16)
    ds = calibration.synthesize(m, {"images": (1, 3, 16, 24)}, samples=3)
    assert ds.inputs["images"].dtype == np.float16
    v = validate(m, m, ds, latency=False)
    assert v.worst_rel_l2 == 0.0 and v.outputs["out"]["non_finite"] == 0
    batches = list(stream_tensors(m, ["a", "out"], ds, batch=1))
    assert len(batches) == 3 and batches[0]["a"].dtype == np.float16 and batches[0]["out"].shape == (1, 16, 24, 6)


def test_timing_sessions_do_not_spin():
    """Two sessions timed interleaved must not leave threads spinning over the other's run
    (on 2 cores that made a model timed against itself read 0.65-1.63x)."""
    from surgeon.validate import session
    s = session(model_io.load(CNN))
    assert s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_drift_interval_is_a_bootstrap_over_rows():
    """The interval brackets the drift, is zero-wide when every row drifts alike, reaches down
    to no drift when one row carries all of it (resamples without that row), and repeats."""
    from surgeon.validate import drift_metrics

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 10))
    noisy = ref + 0.1 * rng.standard_normal((40, 10))
    m = drift_metrics(ref, noisy)
    lo, hi = m["rel_l2_interval"]
    assert lo < m["rel_l2"] < hi and hi - lo < m["rel_l2"]
    assert drift_metrics(ref, noisy)["rel_l2_interval"] == [lo, hi]
    alike = drift_metrics(np.ones((8, 4)), np.full((8, 4), 1.1))["rel_l2_interval"]
    assert np.allclose(alike, [0.1, 0.1])
    one_row = ref.copy()
    one_row[3] += 5.0
    lo1, hi1 = drift_metrics(ref, one_row)["rel_l2_interval"]
    assert lo1 == 0.0 and hi1 > drift_metrics(ref, one_row)["rel_l2"]
    assert drift_metrics(ref[:1], noisy[:1]).get("rel_l2_interval") is None
    nan = noisy.copy()
    nan[0, 0] = np.nan
    assert "rel_l2_interval" not in drift_metrics(ref, nan)


def _pooled_classifier(w: np.ndarray) -> onnx.ModelProto:
    """x (N, 4, 2, 2) -> 1x1 Conv -> GlobalAveragePool: class scores shaped (N, 3, 1, 1), as
    SqueezeNet returns them."""
    from onnx import TensorProto, helper, numpy_helper
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["scores"])],
        "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 2, 2])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3, 1, 1])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_scores_with_trailing_unit_axes_get_agreement_and_accuracy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4, 1, 1))
    x = rng.standard_normal((40, 4, 2, 2)).astype(np.float32)
    ref = _pooled_classifier(w)
    ds = calibration.DataSet({"x": x}, labels=np.zeros(40, dtype=np.int64), source="t")
    flipped = w.copy()
    flipped[[0, 1]] = w[[1, 0]]  # classes 0 and 1 swap: every row whose top-1 is 0 or 1 disagrees
    v = validate(ref, _pooled_classifier(flipped), ds, latency=False)
    top = (x.mean((2, 3)) @ w[:, :, 0, 0].T).argmax(1)
    out = v.outputs["scores"]
    assert out["agreement_rows"] == 40
    assert out["top1_agreement"] == pytest.approx(np.mean(top == 2))
    assert v.accuracy["original"] == pytest.approx(np.mean(top == 0))
    assert v.accuracy["candidate"] == pytest.approx(np.mean(top == 1))
    # a sequence model's per-step scores (T, 1, C) are not (N, C) rows: drift only
    assert "top1_agreement" not in drift_metrics(np.ones((5, 1, 3)), np.ones((5, 1, 3)))


def sequence_model(steps: int = 6, classes: int = 5) -> onnx.ModelProto:
    """A recognizer's layout (the shared OCR model): a static batch of 1, per-step scores [T, 1, C]
    out, the batch on axis 1."""
    from onnx import helper
    from tests.models import init, make_model, tensor
    w = np.random.default_rng(0).normal(size=(classes, classes)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["xt"]),            # [1, C, T]
             helper.make_node("Transpose", ["xt"], ["steps"], perm=[2, 0, 1]),  # [T, 1, C]
             helper.make_node("MatMul", ["steps", "w"], ["y"])]
    return make_model(nodes, [tensor("x", [1, 1, classes, steps])], [tensor("y", [steps, 1, classes])],
                      [init("shape", np.array([1, classes, steps], np.int64)), init("w", w)])


def test_a_row_is_a_sample_when_the_batch_is_not_axis_0():
    """Concatenated along axis 0, 16 samples of [T, 1, C] made 16 T rows of time steps, and the
    drift interval resampled steps: narrower than over the samples it was measured on."""
    from surgeon.validate import rel_l2_interval, run
    m = sequence_model()
    rng = np.random.default_rng(1)
    # the steps of a sample alike (one text line), samples unlike: 96 steps are not 96 samples
    x = np.repeat(rng.normal(size=(16, 1, 5, 1)) * rng.uniform(0.2, 3, size=(16, 1, 1, 1)), 6, axis=3)
    x = (x + 0.01 * rng.normal(size=x.shape)).astype(np.float32)
    ds = calibration.DataSet({"x": x}, batch=1)
    (y,) = run(session(m), ds)
    assert y.shape == (16, 6, 5)  # [N, T, C]
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    w = next(t for t in bad.graph.initializer if t.name == "w")
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * rng.uniform(0.5, 1.5, size=(5, 5))
                                            .astype(np.float32), "w"))
    (z,) = run(session(bad), ds)
    per_sample = rel_l2_interval(y, z)
    per_step = rel_l2_interval(y.reshape(-1, 1, 5), z.reshape(-1, 1, 5))
    assert validate(m, bad, ds, latency=False).outputs["y"]["rel_l2_interval"] == per_sample
    assert per_sample[1] - per_sample[0] > 1.5 * (per_step[1] - per_step[0])


def test_outputs_are_joined_by_sample():
    from surgeon.validate import by_sample
    a, b = np.zeros((2, 3)), np.ones((1, 3))
    assert by_sample([a, b], [2, 1]).shape == (3, 3)                      # batch on axis 0
    seq = [np.full((4, 1, 3), i) for i in range(3)]
    joined = by_sample(seq, [1, 1, 1])                                    # [T, 1, C], batch on axis 1
    assert joined.shape == (3, 4, 3) and (joined[2] == 2).all()
    assert by_sample([np.zeros(5), np.ones(5)], [1, 1]).shape == (2, 5)   # no batch axis: stacked
    assert by_sample([np.zeros(5), np.ones(5)], [2, 2]).shape == (10,)     # a reduction over the batch
    assert by_sample([np.float32(1), np.float32(2)], [1, 1]).shape == (2,)


def _with_label(model: onnx.ModelProto, keep_scores: bool = True) -> onnx.ModelProto:
    """`model` also returning ArgMax(logits) as an int64 `label` (or returning only the label)."""
    from onnx import TensorProto, helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("ArgMax", [out], ["label"], name="argmax", axis=1, keepdims=0))
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    if not keep_scores:
        del m.graph.output[:]
    m.graph.output.append(label)
    return m


def _perturbed(model: onnx.ModelProto) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    w = next(t for t in bad.graph.initializer if t.name == "fc2.weight")
    arr = onnx.numpy_helper.to_array(w).copy()
    arr += 2.0 * arr.std() * np.random.default_rng(0).standard_normal(arr.shape).astype(arr.dtype)
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    return bad


def test_an_integer_label_output_is_compared_by_agreement_not_rel_l2():
    """A classifier that also returns its ArgMax: the rel. L2 of class indices (3 against 4 is
    'closer' than 3 against 9) once was the model's worst drift, failed drift budgets and steered
    int8's choices. A label output agrees or not."""
    from surgeon import budgets
    m = model_io.load(CNN)
    ds = calibration.load_data(CNN_TEST, m).take(200)
    original, candidate = _with_label(m), _with_label(_perturbed(m))
    v = validate(original, candidate, ds, latency=False)
    label, logits = v.outputs["label"], v.outputs["logits"]
    assert label["discrete"] and label["rel_l2"] is None and label["cosine"] is None
    assert 0.5 < label["top1_agreement"] < 1.0
    assert label["top1_agreement"] == pytest.approx(logits["top1_agreement"])  # the same answers
    assert v.worst_rel_l2 == logits["rel_l2"] and v.worst_rel_l2_interval == logits["rel_l2_interval"]
    checks = budgets.evaluate(budgets.Budgets(max_drift=logits["rel_l2"] * 1.01), v.to_json(), None)
    assert checks[0].status == "pass"
    # only the label: no drift to measure (said so), agreement still measured
    only = validate(_with_label(m, keep_scores=False), _with_label(_perturbed(m), keep_scores=False), ds,
                    latency=False)
    assert only.worst_rel_l2 is None and only.top1_agreement == pytest.approx(label["top1_agreement"])
    drift, agree = budgets.evaluate(budgets.Budgets(max_drift=0.1, min_agreement=0.5), only.to_json(), None)
    assert drift.status == "fail" and "every output is integer" in drift.detail
    assert agree.status == "pass"


@pytest.mark.parametrize("shape_b, refused", [([None, 3, 8, 8], False), (["n", 3, "h", "w"], False),
                                              ([2, 3, 8, 8], False), ([None, 3, 16, 16], True),
                                              ([None, 1, 8, 8], True)])
def test_models_whose_fixed_input_sizes_differ_are_refused_by_name(shape_b, refused):
    """Two networks with differently sized inputs (a gate run on the wrong candidate): a clear
    error naming the input and both shapes, not onnxruntime's dimension error for one of them.
    A dynamic size, or a different batch, is no clash."""
    from onnx import helper

    from surgeon.errors import ModelError
    from tests.models import make_model, tensor

    def model(shape):
        return make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", shape)], [tensor("y", shape)])
    a, b = model([None, 3, 8, 8]), model(shape_b)
    data = calibration.DataSet({"x": np.ones((2, 3, 8, 8), np.float32)}, source="ones")
    if refused:
        with pytest.raises(ModelError, match=r"different input shapes: 'x' is \?x3x8x8 in the original, \?x\d+x\d+x\d+ in"):
            validate(a, b, data, latency=False)
    else:
        validate(a, b, data, latency=False)
