"""svi_kernels: fused optimizer kernels for SVI training and Armijo line-search fine-tuning.

    import svi_kernels as sk
    opt = sk.AdamW(model.parameters(), lr=2e-5)          # fused AdamW (C++ CPU / CUDA / Triton)
    handle = sk.svi.attach(model); opt = sk.SVI(model.parameters())
    opt = sk.AdamSLS(model.parameters()); loss = opt.step(lambda: loss_fn(model(x), y))
    opt = sk.SaLSA(model.parameters())                    # smoothed Armijo, searches only while eta changes
    sk.backends()                                         # which backends work here, and why not
"""
from . import svi
from .backends import backends
from .layer_groups import layer_groups
from .optim import SVI, AdamSLS, AdamW, ArmijoSGD, LayerwiseAdamSLS, SaLSA
from .optim._closure import NonFiniteLossError

__version__ = "0.1.0"
__all__ = ["AdamW", "SVI", "ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS", "SaLSA", "layer_groups", "backends", "svi",
           "NonFiniteLossError"]
