"""Entry point of the ``histograms`` plugin (``[project.entry-points.ikkuna] histograms``)."""

from __future__ import annotations

from typing import Any

from ikkuna_core import Subscriber, hookimpl
from ikkuna_core.commands import SubscriberFlag

from .subscribers import DeadFraction, Histogram


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [Histogram, DeadFraction]


@hookimpl
def ikkuna_subscriber_flags() -> list[SubscriberFlag]:
    return [SubscriberFlag("--histogram", "histogram", "histogram of every layer's activations")]


@hookimpl
def ikkuna_default_subscribers() -> list[dict[str, Any]]:
    return [{"name": "histogram", "topics": ["activations"]}, {"name": "dead_fraction"}]
