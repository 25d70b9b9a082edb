"""Fixtures of the CPU kernel tests (tests/backends/test_cpu_*.py, test_stream_stores.py)."""
import pytest


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
