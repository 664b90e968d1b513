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
