"""Random tensor lists for the op tests (imported by tests/backends/* and tests/test_property.py;
tests/ is on sys.path through tests/conftest.py)."""
import torch

# kind -> how a float64 standard-normal draw is shaped into test data
_KINDS = {
    "n": lambda t: t,
    "pos": lambda t: t.abs() * 0.01 + 1e-3,  # strictly positive: second moments
    "small": lambda t: t * 0.1,  # first moments, momentum buffers
    "scaled": lambda t: t * 1024.0,  # gradients of a loss scaled by 2**10 (AMP)
}


def random_list(sizes, dtype, device, kind, gen):
    """One random tensor per size (never zeros), drawn in float64 from ``gen``, then cast."""
    shape = _KINDS[kind]
    return [shape(torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device) for n in sizes]


def random_lists(sizes, dtype, device, seed, kinds):
    """One list per kind, all from one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [random_list(sizes, dtype, device, k, gen) for k in kinds]
