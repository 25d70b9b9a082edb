"""The backends an op test runs on (imported by tests/backends/*; tests/ is on sys.path through
tests/conftest.py): one pytest param per backend, skipped with the reason when unavailable."""
import pytest
import torch

from svi_kernels.backends import BACKENDS, backends

AVAILABLE = backends()
BACKEND_PARAMS = [pytest.param(n, id=n, marks=[] if AVAILABLE[n]["available"] else
                               [pytest.mark.skip(reason=f"{n}: {AVAILABLE[n]['reason']}")]) for n in BACKENDS]


def device_for(name: str) -> str:
    """Where a backend's tensors live: the Triton kernels run on CPU tensors through the
    interpreter when there is no GPU."""
    return "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
