"""Reading and synthesizing validation / calibration inputs."""

import numpy as np
import pytest
from onnx import helper

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
