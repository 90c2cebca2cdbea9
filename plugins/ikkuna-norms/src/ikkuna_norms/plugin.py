"""Entry point of the ``norms`` plugin (``[project.entry-points.ikkuna] norms = ...``)."""

from __future__ import annotations

from ikkuna_core import Subscriber, hookimpl

from .subscribers import Mean, Norm, Ratio, SpectralNorm, Variance


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [Norm, SpectralNorm, Ratio, Mean, Variance]
