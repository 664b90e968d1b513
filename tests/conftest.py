import pytest

from surgeon import zoo


@pytest.fixture(scope="session")
def resnet50():
    """The onnx package's light ResNet-50 with seeded, materialized weights."""
    return zoo.load("resnet50", seed=0)


@pytest.fixture(scope="session")
def vgg19():
    return zoo.load("vgg19", seed=0)


@pytest.fixture
def cnn_copy(tmp_path):
    """The sample CNN copied into the test's folder: commands may write next to it."""
    from tests.models import CNN
    p = tmp_path / "cnn.onnx"
    p.write_bytes(CNN.read_bytes())
    return p


@pytest.fixture(autouse=True, scope="session")
def _private_guard_cache(tmp_path_factory):
    """Latency-guard verdicts go to a per-run cache, never the user's ~/.cache."""
    import os
    os.environ["SURGEON_CACHE_DIR"] = str(tmp_path_factory.mktemp("surgeon-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """numpy's BLAS on one thread. The tests solve many tiny least-squares problems (reference
    solutions for the factorizations); multithreaded OpenBLAS on a loaded 2-core machine was
    measured 40 s instead of 0.3 s on one such test. No test asserts a latency, and
    onnxruntime's own threads are unaffected."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        yield
