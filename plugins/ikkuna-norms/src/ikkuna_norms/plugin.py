"""Entry point of the ``norms`` plugin (``[project.entry-points.ikkuna] norms = ...``)."""

from __future__ import annotations

from typing import Any

from ikkuna_core import Subscriber, hookimpl
from ikkuna_core.commands import SubscriberFlag

from .subscribers import GlobalNorm, Mean, Norm, Ratio, SpectralNorm, Variance


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [Norm, GlobalNorm, SpectralNorm, Ratio, Mean, Variance]


@hookimpl
def ikkuna_subscriber_flags() -> list[SubscriberFlag]:
    return [
        SubscriberFlag("--spectral-norm", "spectral_norm", "largest singular value of the weights"),
        SubscriberFlag("--ratio", "ratio", "update-to-weight norm ratio of every layer"),
    ]


@hookimpl
def ikkuna_default_subscribers() -> list[dict[str, Any]]:
    return [
        {"name": "norm", "topics": ["weight_gradients"]},
        {"name": "spectral_norm", "topics": ["weights"]},
        {"name": "ratio", "topics": ["weight_updates", "weights"]},
    ]
