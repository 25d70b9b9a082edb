"""Hyperparameter validation, with torch.optim's wording where torch has one (ours says more)."""
from __future__ import annotations

from torch import Tensor


def one_element(x: Tensor, name: str) -> None:
    """A hyperparameter tensor must hold one number (torch's wording first)."""
    if x.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element: {name} must be a number or a one-element tensor, "
                         f"got shape {tuple(x.shape)}")


def as_float(x, name: str) -> float:
    """A hyperparameter given as a number or a 0-d tensor, as a Python float."""
    if isinstance(x, Tensor):
        one_element(x, name)
        return float(x.item())
    return float(x)


# torch.optim's wording for each hyperparameter, so a message matches torch's (ours says more).
_TORCH_LABEL = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value",
                "momentum": "momentum value", "dampening": "dampening value"}


def _tensor_hyper(value, name: str, foreach, capturable: bool) -> None:
    """torch's rules for a hyperparameter given as a tensor: one element, and not with foreach=True
    unless capturable=True (torch's foreach path reads it as a number)."""
    if foreach and not capturable:
        raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
    one_element(value, name)


def check_lr(lr, name: str = "lr", *, foreach=None, capturable: bool = False) -> None:
    if isinstance(lr, Tensor):
        _tensor_hyper(lr, name, foreach, capturable)
    check_nonneg(lr, name)


def check_betas(betas, *, foreach=None, capturable: bool = False) -> None:
    """A pair in [0, 1), both Python floats or both tensors (torch refuses a mix)."""
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor):
            _tensor_hyper(b, f"betas[{i}]", foreach, capturable)
        v = as_float(b, f"betas[{i}]")
        if not 0.0 <= v < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {v} (must be in [0, 1))")
    if not (all(isinstance(b, Tensor) for b in betas) or all(isinstance(b, float) for b in betas)):
        raise ValueError(f"betas must be either both floats or both Tensors, got "
                         f"({type(betas[0]).__name__}, {type(betas[1]).__name__})")


def check_nonneg(value, name: str) -> None:
    v = as_float(value, name)
    if not v >= 0.0:  # also catches NaN
        label = _TORCH_LABEL.get(name, f"{name} value")
        raise ValueError(f"Invalid {label}: {value if not isinstance(value, Tensor) else v} ({name} must be >= 0)")


def check_open_unit(value, name: str) -> None:
    v = as_float(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"Invalid {name}: {v} (must be in (0, 1))")


def check_positive(value, name: str) -> None:
    v = as_float(value, name)
    if not v > 0.0:
        raise ValueError(f"Invalid {name}: {v} (must be > 0)")


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value
