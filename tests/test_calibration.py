"""Reading and synthesizing validation / calibration inputs."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from surgeon import calibration, model as model_io
from surgeon.errors import UsageError
from tests.models import CNN, CNN_TEST, MLP, make_model, tensor


def two_input_model(dims_a=("N", 3), dims_b=("N", 3)):
    node = helper.make_node("Add", ["a", "b"], ["y"])
    return make_model([node], [tensor("a", list(dims_a)), tensor("b", list(dims_b))], [tensor("y", None)])


def test_load_npz_with_labels():
    ds = calibration.load_data(CNN_TEST, model_io.load(CNN))
    assert len(ds) == 450 and ds.labels.shape == (450,) and not ds.synthetic
    assert ds.inputs["input"].dtype == np.float32


def test_npz_for_two_inputs(tmp_path):
    m = two_input_model()
    np.savez(tmp_path / "d.npz", a=np.ones((5, 3), np.float32), b=np.zeros((5, 3), np.float32))
    ds = calibration.load_data(tmp_path / "d.npz", m)
    assert set(ds.inputs) == {"a", "b"}
    assert [len(b["a"]) for b in ds.batches(2)] == [2, 2, 1]


def test_npy_feeds_a_single_input(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    ds = calibration.load_data(tmp_path / "x.npy", model_io.load(MLP))
    assert ds.inputs["input"].shape == (3, 64)
    with pytest.raises(UsageError, match="single input"):
        calibration.load_data(tmp_path / "x.npy", two_input_model())


@pytest.mark.parametrize("arrays,match", [
    ({"wrong": np.zeros((2, 64), np.float32)}, "no array for input"),
    ({"input": np.zeros((2, 65), np.float32)}, "model wants"),
    ({"input": np.zeros((2, 1, 64), np.float32)}, "model wants"),
    ({"input": np.zeros((2, 64), np.float32), "labels": np.zeros(3)}, "'labels' has 3 rows"),
])
def test_data_that_does_not_fit_is_a_clear_error(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError, match=match):
        calibration.load_data(tmp_path / "d.npz", model_io.load(MLP))


def test_non_finite_inputs_are_a_clear_error_naming_the_sample(tmp_path):
    """A NaN in calibration data poisoned every covariance after it: 26 of EfficientNet-Lite0's
    fits failed with numpy's 'array must not contain infs or NaNs'."""
    x = np.zeros((6, 64), np.float32)
    x[4, 7], x[5, 0] = np.nan, np.inf
    np.savez(tmp_path / "d.npz", input=x)
    with pytest.raises(UsageError, match=r"d.npz: 'input' holds 2 NaN/Inf value\(s\), in 2 sample\(s\) \(the first: row 4\)"):
        calibration.load_data(tmp_path / "d.npz", model_io.load(MLP))
    np.savez(tmp_path / "ok.npz", input=x[:4])  # finite rows load
    assert len(calibration.load_data(tmp_path / "ok.npz", model_io.load(MLP))) == 4


def test_unreadable_data_file(tmp_path):
    (tmp_path / "d.npz").write_text("nope")
    with pytest.raises(UsageError, match="cannot read"):
        calibration.load_data(tmp_path / "d.npz", model_io.load(MLP))
    with pytest.raises(UsageError, match="no such data file"):
        calibration.load_data(tmp_path / "missing.npz", model_io.load(MLP))


def test_synthesized_inputs_are_seeded_and_follow_the_signature():
    m = model_io.load(CNN)
    a = calibration.synthesize(m, samples=3, seed=1)
    b = calibration.synthesize(m, samples=3, seed=1)
    c = calibration.synthesize(m, samples=3, seed=2)
    assert a.synthetic and a.inputs["input"].shape == (3, 1, 32, 32)
    np.testing.assert_array_equal(a.inputs["input"], b.inputs["input"])
    assert not np.array_equal(a.inputs["input"], c.inputs["input"])


def test_dynamic_non_batch_dim_must_be_given():
    m = two_input_model(("N", "D"), ("N", "D"))
    with pytest.raises(UsageError, match=r"dynamic dimension 1 \(D\).*--shape a="):
        calibration.resolve_shapes(m)
    shapes = calibration.resolve_shapes(m, {"a": (2, 5), "b": (2, 5)})
    assert shapes == {"a": (2, 5), "b": (2, 5)}


def test_shape_parsing_and_checks():
    assert calibration.parse_shapes(["x=1x3x224x224"]) == {"x": (1, 3, 224, 224)}
    for bad in ("x=1xAx2", "1x2", "x=0x3"):
        with pytest.raises(UsageError, match="bad --shape"):
            calibration.parse_shapes([bad])
    with pytest.raises(UsageError, match="unknown input"):
        calibration.resolve_shapes(model_io.load(MLP), {"nope": (1, 64)})
    with pytest.raises(UsageError, match="does not fit"):
        calibration.resolve_shapes(model_io.load(MLP), {"input": (1, 63)})


def test_static_batch_models_get_whole_batches():
    m = two_input_model((4, 3), (4, 3))
    ds = calibration.synthesize(m, samples=10)
    assert ds.batch == 4
    assert [len(b["a"]) for b in ds.batches()] == [4, 4]


# --- shapes without asking, models without a batch axis (issue 8) -------------------------------------

def test_dynamic_dims_can_stay_unknown_with_a_hint():
    m = two_input_model(("N", "D"), ("N", 3))
    shapes = calibration.resolve_shapes(m, required=False)
    assert shapes == {"a": None, "b": (1, 3)}
    hint = calibration.shape_hint(m, shapes)
    assert hint == "input 'a' (N, D) has dynamic dimensions; pass --data, or --shape a=1x? with the ?s filled in"
    assert calibration.shape_hint(m, {"a": (1, 4), "b": (1, 3)}) is None
    with pytest.raises(UsageError, match="cannot synthesize inputs: input 'a' \\(N, D\\)"):
        calibration.synthesize(m)


def test_data_shapes_count_one_batch():
    m = two_input_model(("N", "D"), ("N", "D"))
    ds = calibration.DataSet({"a": np.zeros((5, 7), np.float32), "b": np.zeros((5, 7), np.float32)})
    assert calibration.shapes_from_data(ds) == {"a": (1, 7), "b": (1, 7)}
    assert calibration.resolve_shapes(m, calibration.shapes_from_data(ds)) == {"a": (1, 7), "b": (1, 7)}


def matmul_of_two_fixed_inputs():
    """onnx's pytorch-operator test_operator_mm: A[2,3] @ B[3,4], no batch axis at all."""
    return make_model([helper.make_node("MatMul", ["a", "b"], ["y"])], [tensor("a", [2, 3]), tensor("b", [3, 4])],
                      [tensor("y", [2, 4])])


def test_a_model_without_a_batch_axis_gets_whole_feeds():
    """The corpus sweep: "--shape 0=1x3 does not fit the model's input (2, 3)" though no --shape was given."""
    from surgeon.validate import run, session
    m = matmul_of_two_fixed_inputs()
    assert calibration.unbatched(m)
    ds = calibration.synthesize(m, samples=3)
    assert ds.stacked and ds.inputs["a"].shape == (3, 2, 3) and ds.inputs["b"].shape == (3, 3, 4)
    feeds = list(ds.batches(2))
    assert len(feeds) == 3 and feeds[0]["a"].shape == (2, 3)
    assert calibration.shapes_from_data(ds) == {"a": (2, 3), "b": (3, 4)}
    (y,) = run(session(m), ds)
    assert y.shape == (3, 2, 4)  # three feeds of (2, 4), a row each: a row is a sample (validate.by_sample)
    assert ds.rows(1, 3).stacked and len(ds.take(2)) == 2


def test_scalar_inputs_are_fed_one_row_at_a_time(tmp_path):
    m = make_model([helper.make_node("Add", ["s", "t"], ["y"])], [tensor("s", []), tensor("t", [])],
                   [tensor("y", [])])
    ds = calibration.synthesize(m, samples=4)
    assert ds.stacked and [f["s"].shape for f in ds.batches()] == [()] * 4
    np.savez(tmp_path / "one.npz", s=np.float32(1.0), t=np.float32(2.0))  # a single feed, no row axis
    one = calibration.load_data(tmp_path / "one.npz", m)
    assert len(one) == 1 and one.first_batch()["s"].shape == ()


def test_fp16_inputs_are_synthesized_in_fp16():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 4], TensorProto.FLOAT16)],
                   [tensor("y", ["N", 4], TensorProto.FLOAT16)])
    ds = calibration.synthesize(m, samples=2)
    assert ds.inputs["x"].dtype == np.float16 and ds.inputs["x"].shape == (2, 4)


def test_synthesized_indices_stay_inside_the_table_they_index():
    """The corpus sweep: int8 on pytorch-converted test_Embedding failed on idx=4 of a 4-row table."""
    from surgeon.validate import run, session
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    m = make_model([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], [tensor("ids", ["N", 5], TensorProto.INT64)],
                   [tensor("y", None)], [helper.make_tensor("table", TensorProto.FLOAT, [4, 3], table.ravel())])
    ds = calibration.synthesize(m, samples=16)
    assert ds.inputs["ids"].max() == 3 and ds.inputs["ids"].min() == 0
    assert run(session(m), ds)[0].shape == (16, 5, 3)


def test_integer_data_for_a_float_model_is_fed_unscaled_with_a_warning(tmp_path, caplog):
    """uint8 photos given to a model that takes normalised floats calibrated and validated on
    inputs the model never sees, without a word."""
    import logging
    m = model_io.load(CNN)
    x = np.load(CNN_TEST)["input"]
    np.savez(tmp_path / "u8.npz", input=np.round(255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8))
    np.savez(tmp_path / "f64.npz", input=x.astype(np.float64))
    with caplog.at_level(logging.WARNING):
        ds = calibration.load_data(tmp_path / "u8.npz", m)
    assert ds.inputs["input"].dtype == np.float32 and ds.inputs["input"].max() == 255
    [msg] = [r.getMessage() for r in caplog.records]
    assert "'input' is uint8 (0..255)" in msg and "unscaled" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        calibration.load_data(tmp_path / "f64.npz", m)
    assert not caplog.records
