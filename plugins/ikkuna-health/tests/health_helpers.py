"""Helpers of the health tests (importable through conftest.py): models with a NaN or inf
planted where the test knows it is (in a chosen module's forward, in its backward through a
custom autograd function), and the usual training loop, which can skip the optimizer on a
non-finite loss."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend


class Planted(nn.Module):
    """A leaf linear layer that plants a value (NaN, inf) at one training call: in its output
    (``where = "forward"``), in its input gradient or its weight gradient (a custom autograd
    function: ``"input_grad"``, ``"weight_grad"``)."""

    def __init__(self, n_in: int, n_out: int, where: str = "forward", at: int = -1,
                 value: float = float("nan")) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.where, self.at, self.value = where, at, value
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plant = self.training and torch.is_grad_enabled() and self.calls in _as_set(self.at)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
        weight = self.weight
        if plant and self.where == "input_grad":
            x = _BadGrad.apply(x, self.value)
        if plant and self.where == "weight_grad":
            weight = _BadGrad.apply(weight, self.value)
        y = F.linear(x, weight, self.bias)
        if plant and self.where == "forward":
            y = y.clone()
            y[0, 0] = self.value
        return y


def _as_set(at: int | set[int]) -> set[int]:
    return at if isinstance(at, set) else {at}


class _BadGrad(torch.autograd.Function):
    """Identity forward; the backward puts ``value`` into the gradient's first row (a
    single entry could meet a ReLU's zero upstream and vanish there, harmlessly)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: float) -> torch.Tensor:
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        grad[0] = ctx.value
        return grad, None


def mlp(planted: Planted) -> nn.Sequential:
    """input -> 0 Linear -> 1 ReLU -> 2 planted -> 3 ReLU -> 4 Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), planted, nn.ReLU(), nn.Linear(16, 3))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


@contextmanager
def caught() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        yield found


def health_warnings(found: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in found
            if issubclass(w.category, RuntimeWarning) and "ikkuna health" in str(w.message)]


def train(
    model: nn.Module,
    subscribers: list[ik.Subscriber],
    steps: int,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    skip_bad: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    data: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    backend: Any = None,
    before_step: Callable[[int], None] | None = None,
) -> tuple[ik.Exporter, MemoryBackend]:
    """The usual loop; with ``skip_bad`` it skips the optimizer on a non-finite loss, as
    user code does (``if not torch.isfinite(loss): continue``)."""
    exporter = ik.Exporter()
    exporter.set_model(model)
    loss = exporter.set_loss(loss_fn or nn.CrossEntropyLoss())
    for sub in subscribers:
        exporter.bus.register_subscriber(sub)
    memory = MemoryBackend()
    exporter.bus.add_backend(memory)
    if backend is not None:
        exporter.bus.add_backend(backend)
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.05)
    for i, (x, y) in enumerate(data or batches(steps)):
        opt.zero_grad()
        value = loss(model(x), y)
        value.backward()
        if skip_bad and not torch.isfinite(value):
            continue
        if before_step is not None:
            before_step(i)
        opt.step()
    exporter.close()
    return exporter, memory
