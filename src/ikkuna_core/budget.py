"""Cadences from a cost budget: pure arithmetic on measured costs, no torch.

A subscriber's *cadence* is every how many steps it runs. Given each subscriber's measured
cost per run (a fraction of the plain step time), the configured ``subsample`` of each (the
most often it may run) and a budget (the fraction of the plain step time watching may take
on average), :func:`plan` picks cadences from the ladder ``subsample * 2**j`` (1, 2, 4, 8, …
for ``subsample = 1``), so a subscriber runs at the multiples of its cadence and its curve
stays evenly spaced; a larger cadence's steps are a subset of a smaller one's. The most
expensive subscriber (by its cost per step, amortised over its cadence) is slowed first, one
doubling at a time, until the amortised costs fit the budget: cheap subscribers keep running
often, expensive ones fit by construction. :func:`decide` adds hysteresis, so measurement
noise near a rung does not flip a cadence back and forth.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TypeVar

__all__ = ["MAX_DOUBLINGS", "amortised", "decide", "plan"]

K = TypeVar("K", bound=Hashable)

#: The slowest a budget makes a subscriber: ``subsample * 2**MAX_DOUBLINGS`` steps.
MAX_DOUBLINGS = 20


def _check(budget: float, costs: Mapping[K, float], floors: Mapping[K, int]) -> None:
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a number > 0 (a fraction of the step), got {budget!r}")
    for key, cost in costs.items():
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost of {key!r} must be a finite number >= 0, got {cost!r}")
        if key not in floors:
            raise ValueError(f"{key!r} has a cost but no subsample")
    for key, floor in floors.items():
        if not (isinstance(floor, int) and floor >= 1):
            raise ValueError(f"subsample of {key!r} must be an integer >= 1, got {floor!r}")


def amortised(costs: Mapping[K, float], cadences: Mapping[K, int]) -> float:
    """The average cost per step (a fraction of the plain step) of running each subscriber
    every ``cadences[key]`` steps at ``costs[key]`` per run."""
    return sum(cost / cadences[key] for key, cost in costs.items())


def plan(
    costs: Mapping[K, float],
    budget: float,
    floors: Mapping[K, int],
    *,
    max_doublings: int = MAX_DOUBLINGS,
) -> dict[K, int]:
    """Cadences (``floors[key] * 2**j``) whose amortised cost fits ``budget``: start every
    subscriber at its floor, then double the cadence of the one costing most per step
    (ties: the first in ``floors``' order) until the total fits, or every cadence is at
    ``floor * 2**max_doublings``. Keys of ``floors`` without a cost keep their floor."""
    _check(budget, costs, floors)
    cadence = dict(floors)
    doublings = dict.fromkeys(floors, 0)
    order = list(floors)
    while amortised(costs, cadence) > budget:
        movable = [k for k in order if k in costs and costs[k] > 0
                   and doublings[k] < max_doublings]
        if not movable:
            break
        worst = max(movable, key=lambda k: costs[k] / cadence[k])  # first of equals wins
        cadence[worst] *= 2
        doublings[worst] += 1
    return cadence


def decide(
    costs: Mapping[K, float],
    budget: float,
    floors: Mapping[K, int],
    current: Mapping[K, int],
    *,
    tolerance: float = 0.1,
    faster: float = 0.5,
) -> dict[K, int]:
    """The cadences to use from now on: ``current`` while it fits the budget within
    ``tolerance`` (10 %) and uses at least ``faster`` (half) of what :func:`plan`'s would;
    otherwise :func:`plan`'s. Slowing down is quick and speeding up asks for a wide
    margin: per-run costs measured on a busy machine vary by tens of percent, and a
    cadence flipping between two rungs re-plans the capture each time and spaces the
    curve unevenly. Keys without a cost keep their current cadence."""
    proposal = plan(costs, budget, floors)
    for key in floors:
        if key not in costs:
            proposal[key] = current.get(key, floors[key])
    now = dict(current)
    for key in floors:
        now.setdefault(key, floors[key])
    used = amortised(costs, now)
    if proposal == now:
        return now
    if used <= budget * (1 + tolerance) and used >= faster * amortised(costs, proposal):
        return now
    return proposal
