"""Entry point of the ``gradstats`` plugin (``[project.entry-points.ikkuna] gradstats = ...``)."""

from __future__ import annotations

from ikkuna_core import Subscriber, hookimpl

from .subscribers import (
    Alpha,
    Distance,
    EarlyStopping,
    GradHist2d,
    InnerTest,
    MeanGSNR,
    NormTest,
    OrthoTest,
)


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [NormTest, InnerTest, OrthoTest, MeanGSNR, EarlyStopping, Alpha, Distance, GradHist2d]
