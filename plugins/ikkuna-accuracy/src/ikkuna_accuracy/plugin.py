"""Entry point of the ``accuracy`` plugin (``[project.entry-points.ikkuna] accuracy``)."""

from __future__ import annotations

from ikkuna_core import Subscriber, hookimpl

from .subscribers import Loss, TestAccuracy, TrainAccuracy


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [TrainAccuracy, TestAccuracy, Loss]
