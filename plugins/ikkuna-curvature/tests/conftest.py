"""Fixtures of ikkuna-curvature's tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.func import functional_call

HessianFn = Callable[..., torch.Tensor]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and parallel test workers share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _explicit_hessian(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    parameters: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The full cross-entropy loss Hessian in float64 over all parameters, in
    ``model.parameters()`` order (the order the plugin flattens them in), at ``parameters``
    (default: the model's own)."""
    names = [n for n, _ in model.named_parameters()]
    values = parameters or {n: p.detach() for n, p in model.named_parameters()}
    shapes = [values[n].shape for n in names]
    flat = torch.cat([values[n].reshape(-1) for n in names]).double()
    model64 = copy.deepcopy(model).double()
    loss_fn = nn.CrossEntropyLoss()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return loss_fn(functional_call(model64, params, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


@pytest.fixture
def explicit_hessian() -> HessianFn:
    """The independent reference: ``explicit_hessian(model, x, y, parameters=None)``."""
    return _explicit_hessian
