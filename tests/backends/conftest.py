"""Fixtures of the op tests: ``backend`` (every backend, skipped with the reason where unavailable) and
the CPU kernel tests' (tests/backends/test_cpu_*.py, test_stream_stores.py)."""
import pytest

from backend_params import BACKEND_PARAMS


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """The name of each backend in turn (tests/backend_params.py)."""
    return request.param


@pytest.fixture(scope="module")
def cpu():
    """The compiled CPU backend's ops (the tests that use it skip when it is unavailable)."""
    from svi_kernels.backends import get
    return get("cpu")


@pytest.fixture
def stream_threshold():
    """Sets the CPU ops' streaming-store threshold (bytes; returns the old one), restored afterwards."""
    import svi_kernels._C as C
    old = C._stream_min_bytes()
    yield lambda n: C._stream_min_bytes(n)
    C._stream_min_bytes(old)
