"""Entry point of the ``health`` plugin (``[project.entry-points.ikkuna] health = ...``)."""

from __future__ import annotations

from ikkuna_core import Subscriber, hookimpl

from .nonfinite import NonFinite
from .spikes import Spikes


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [NonFinite, Spikes]
