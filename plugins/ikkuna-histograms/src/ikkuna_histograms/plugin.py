"""Entry point of the ``histograms`` plugin (``[project.entry-points.ikkuna] histograms``)."""

from __future__ import annotations

from ikkuna_core import Subscriber, hookimpl

from .subscribers import DeadFraction, Histogram


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [Histogram, DeadFraction]
