"""The optimizers. Each is a thin torch.optim.Optimizer over functional, backend-dispatched updates."""
from .adam_sls import AdamSLS
from .adamw import AdamW, adamw
from .armijo_sgd import ArmijoSGD
from .layerwise import LayerwiseAdamSLS
from .salsa import SaLSA
from .svi import SVI, svi_sgd

__all__ = ["AdamW", "SVI", "ArmijoSGD", "AdamSLS", "LayerwiseAdamSLS", "SaLSA", "adamw", "svi_sgd"]
