import pytest

from surgeon import zoo


@pytest.fixture(scope="session")
def resnet50():
    """The onnx package's light ResNet-50 with seeded, materialized weights."""
    return zoo.load("resnet50", seed=0)


@pytest.fixture(scope="session")
def vgg19():
    return zoo.load("vgg19", seed=0)
