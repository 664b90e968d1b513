"""Same input and options -> byte-identical output, twice in a row, for every built-in plugin
(through the API: surgeon.apply then surgeon.model.save)."""

import hashlib

import pytest

import surgeon
from surgeon import model as model_io
from surgeon.plugin import registry
from tests.models import CNN, CNN_CALIB

BUILTINS = [p.name for p in registry() if registry().origin(p.name).startswith("built-in")]


@pytest.fixture(scope="module")
def cnn():
    return model_io.load(CNN)


@pytest.mark.parametrize("plugin", BUILTINS)
def test_same_command_writes_the_same_bytes(cnn, plugin, tmp_path):
    data = surgeon.load_data(CNN_CALIB, cnn)
    digests = []
    for run in range(2):
        result = surgeon.apply(cnn, plugin, data=data, seed=0)
        path = model_io.save(result.model, tmp_path / f"run{run}.onnx")
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert len(BUILTINS) >= 3


def test_synthesized_data_is_the_same_twice(cnn, tmp_path):
    """Without --data the plugin's data is synthesized, seeded: still the same bytes."""
    outs = [surgeon.apply(cnn, "svd", {"ratio": 0.25}).model.SerializeToString(deterministic=True) for _ in range(2)]
    assert outs[0] == outs[1]
