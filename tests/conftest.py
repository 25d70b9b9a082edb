import os

import pytest

# Triton reads TRITON_INTERPRET when its kernels are defined, so this must run before anything
# imports triton. Without a GPU the Triton kernels run on CPU tensors through the interpreter;
# with one they are compiled and tested on CUDA tensors.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


# Host reads of device values: what a capturable / line-search step must keep to a known count.
HOST_READS = ("tolist", "item", "__float__", "__bool__", "__int__")


@pytest.fixture
def count_reads(monkeypatch):
    """counter["n"] counts calls of the Tensor methods that read a value back to the host."""
    import torch

    counter = {"n": 0}
    for name in HOST_READS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, **k):
            counter["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counter
