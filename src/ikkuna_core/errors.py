"""Errors Ikkuna raises while a model trains. Each names what failed (subscriber, backend,
hook), the step and the topic, with the original exception as its cause."""

from __future__ import annotations

__all__ = ["BackendError", "IkkunaError", "SubscriberError"]


class IkkunaError(RuntimeError):
    """Something inside Ikkuna failed while watching a model (raised only with
    ``on_error = "raise"``; with ``"warn"`` it is a warning and training goes on)."""


class SubscriberError(IkkunaError):
    """A subscriber raised while computing its metrics."""


class BackendError(IkkunaError):
    """One or more backends failed to write or to close; every other backend still got its
    records (and was closed)."""
