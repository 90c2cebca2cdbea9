"""The module the entry point names: pluggy collects its ``@hookimpl`` functions."""

from __future__ import annotations

from ikkuna_core import Backend, Subscriber, hookimpl

from .backends import JsonLinesBackend
from .subscribers import MaxAbs, MeanAbs


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    """The subscriber classes this plugin provides; a configuration refers to each by its
    ``name``, which must not clash with another installed plugin's."""
    return [MeanAbs, MaxAbs]


@hookimpl
def ikkuna_backends() -> list[type[Backend]]:
    """The backend classes this plugin provides, by their ``name``."""
    return [JsonLinesBackend]
