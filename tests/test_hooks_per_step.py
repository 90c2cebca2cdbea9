"""The watched modules' forward hooks are installed only at steps whose subscribers want a
forward topic: at the other steps the modules run on torch's fast path, and the values of
the due steps are those of an independent hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend


def test_forward_hooks_only_at_steps_that_capture() -> None:
    from ikkuna_norms import Norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    exporter = ik.Exporter(model, nn.CrossEntropyLoss(), bus=ik.MessageBus(on_error="raise"))
    exporter.subscribe(Norm(topics=["activations"], subsample=3))
    exporter.subscribe(Norm(topics=["weight_gradients"]))  # every step: steps stay open
    backend = MemoryBackend()
    exporter.bus.attach_backend(backend)
    expected: dict[tuple[str, int], float] = {}
    hooked: list[int] = []
    now = [0]  # the step the independent hooks record under

    def independent(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            expected[(f"norm/activations/{name}", now[0])] = float(output.detach().norm())
        return hook

    for name, module in model.named_children():
        module.register_forward_hook(independent(name))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for step in range(9):
        now[0] = step
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        out = model(x)
        hooked.append(len(model[0]._forward_hooks))  # ours, besides the test's own
        exporter.loss_fn(out, y).backward()
        opt.step()
    exporter.close()
    assert hooked == [2, 1, 1, 2, 1, 1, 2, 1, 1]
    got = {(r.tag, r.step): r.value for r in backend.scalars if "activations" in r.tag}
    assert {s for _, s in got} == {0, 3, 6}
    for key, value in got.items():
        assert value == pytest.approx(expected[key], rel=1e-6), key
