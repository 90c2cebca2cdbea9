"""Entry point of the ``curvature`` plugin (``[project.entry-points.ikkuna] curvature``)."""

from __future__ import annotations

from ikkuna_core import Subscriber, hookimpl

from .subscribers import ConditionNumber, GradientNoiseScale, HessianMaxEigenvalue, HessianTrace


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [ConditionNumber, HessianMaxEigenvalue, HessianTrace, GradientNoiseScale]
