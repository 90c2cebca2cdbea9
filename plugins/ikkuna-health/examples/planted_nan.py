"""A small CNN with NaNs planted in three places, one per run, watched by ``nonfinite`` and
``spikes``: what the plugin says (its README shows this script's output).

    python plugins/ikkuna-health/examples/planted_nan.py
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_health import NonFinite, Spikes


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + x)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def run(title: str, plant: str) -> None:
    net = model()
    exporter = ik.Exporter()
    exporter.set_model(net)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    exporter.bus.register_subscriber(NonFinite())
    exporter.bus.register_subscriber(Spikes())
    last = list(net[5].parameters())
    rest = [p for p in net.parameters() if all(p is not q for q in last)]
    opt = torch.optim.SGD([{"params": rest}, {"params": last}], lr=0.05)
    g = torch.Generator().manual_seed(1)
    print(f"--- {title}")
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        for step in range(40):
            x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
            opt.zero_grad()
            if plant == "forward" and step == 30:  # one bad weight entry, put in by hand
                with torch.no_grad():
                    net[2].conv.weight[0, 0, 0, 0] = math.inf
            loss = loss_fn(net(x), y)
            loss.backward()
            if plant == "backward" and step == 25:
                net[1].conv.weight.grad[1, 1, 1, 1] = math.nan
            if not torch.isfinite(loss) or not all(
                torch.isfinite(p.grad).all() for p in net.parameters()
            ):
                if plant == "forward":  # a bad weight stays bad: undo it, as a fix would
                    with torch.no_grad():
                        net[2].conv.weight[0, 0, 0, 0] = 0.0
                continue  # skip the optimizer step, as training code does
            if plant == "update" and step == 20:  # a learning rate gone wrong, in one group
                opt.param_groups[1]["lr"] = math.inf
            opt.step()
        exporter.close()
    for w in found:
        print(f"{w.category.__name__}: {w.message}")


if __name__ == "__main__":
    run("a NaN from the forward of a convolution (an inf weight)", "forward")
    run("a NaN in one parameter gradient", "backward")
    run("an optimizer update that makes the last layer's weights non-finite", "update")
