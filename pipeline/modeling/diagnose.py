"""Where a non-finite training step came from: a weight, a module's output, the loss, or a gradient.

"loss is NaN" says nothing about the cause; the module that produced the first NaN/inf does (an attention
softmax overflowing, a LayerNorm fed huge activations, a CRF fed wild emissions). This runs only after a step
has already gone non-finite (``TrainingRun._skip_step``): normal steps register no hooks and pay nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

LOSS_MODULES = ("crf",)  # a module whose output is the loss itself (the CRF's log-likelihood)


@dataclass(frozen=True)
class Origin:
    """What went non-finite first: ``kind`` is weight, output, loss, gradient or unknown; ``name`` the place."""

    kind: str
    name: str = ""
    others: int = 0  # further parameters with a non-finite gradient

    def __str__(self) -> str:
        if self.kind == "weight":
            return f"weight {self.name} is already not finite"
        if self.kind == "output":
            return f"module {self.name} produced the first non-finite output"
        if self.kind == "loss":
            return f"the loss ({self.name}) went non-finite, its inputs were finite"
        if self.kind == "gradient":
            more = f" (and {self.others} more parameters)" if self.others else ""
            return f"forward was finite; the gradient of {self.name} went non-finite first{more}"
        return "no weight, module output or gradient is non-finite when the batch is run again"


def has_nonfinite(value: Any) -> bool:
    """NaN/inf anywhere in a module's output: a tensor, or tuples, lists and dicts (``ModelOutput``) of them."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return any(has_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(has_nonfinite(v) for v in value.values())
    return False


def nonfinite_weight(model: torch.nn.Module) -> str | None:
    """The first parameter that is NaN/inf before any forward: every later output is then suspect."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return name
    return None


def nonfinite_grads(model: torch.nn.Module) -> list[str]:
    """Parameters with a NaN/inf gradient, nearest the loss first.

    Backward runs from the loss towards the embeddings, roughly the reverse of registration order, so the
    first name is where the gradient most likely went bad; the ones after it inherited it.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    return [n for n, p in reversed(named) if not bool(torch.isfinite(p.grad).all())]


@contextlib.contextmanager
def watch_outputs(model: torch.nn.Module) -> Iterator[list[str]]:
    """Forward hooks on every module; yields a list that receives the first module whose output is non-finite.

    Hooks fire as modules finish, innermost first, so the first hit is the module that made the NaN/inf, not
    one of its parents that merely passed it on.
    """
    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not found and has_nonfinite(output):
                found.append(name or type(module).__name__)
        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def trace_origin(model: torch.nn.Module, rerun: Callable[[], None]) -> Origin:
    """Find the origin of a non-finite step whose gradients are still in place; ``rerun`` repeats its forwards.

    Order: a weight already bad explains everything; else the first module output that goes non-finite when
    the step's batches are run again; else (the forward was finite) the gradient.
    """
    weight = nonfinite_weight(model)
    if weight is not None:
        return Origin("weight", weight)
    with watch_outputs(model) as found, torch.no_grad():
        rerun()
    if found:
        return Origin("loss" if found[0] in LOSS_MODULES else "output", found[0])
    grads = nonfinite_grads(model)
    if grads:
        return Origin("gradient", grads[0], len(grads) - 1)
    return Origin("unknown")
