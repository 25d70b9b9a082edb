"""Param groups of the line searches: they have no ``lr`` (the step size is searched every step), so
torch's LR schedulers, which read ``group["lr"]``, get an error that says so instead of ``KeyError: 'lr'``."""
from __future__ import annotations


class SearchedStepSizeError(KeyError):
    """``group["lr"]`` of a line-search optimizer. A KeyError (code that catches it keeps working)
    whose message reads as a sentence."""

    def __str__(self) -> str:
        return str(self.args[0])


class SearchedStepGroup(dict):
    """A param group (a dict, pickled and state_dict-ed as one) that explains a missing ``lr``."""

    __slots__ = ("opt_name",)

    def __init__(self, group: dict, opt_name: str):
        super().__init__(group)
        self.opt_name = opt_name

    def __missing__(self, key):
        if key == "lr":
            raise SearchedStepSizeError(
                f"{self.opt_name} has no 'lr': its step size is searched at every step (starting from "
                f"init_step_size), so an LR scheduler (torch.optim.lr_scheduler) has nothing to set. Set "
                f"init_step_size (and the search's c, beta_b, gamma) instead, or use sk.SVI / sk.AdamW to "
                f"follow an lr schedule.")
        raise KeyError(key)

    def __reduce__(self):  # copy/deepcopy/pickle keep the class and the name
        return (SearchedStepGroup, (dict(self), self.opt_name))


def wrap_groups(opt) -> None:
    """Make every param group of ``opt`` a SearchedStepGroup (after construction or a load)."""
    opt.param_groups[:] = [g if isinstance(g, SearchedStepGroup) else SearchedStepGroup(g, type(opt).__name__)
                           for g in opt.param_groups]
