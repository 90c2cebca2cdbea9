"""Entry point of the ``accuracy`` plugin (``[project.entry-points.ikkuna] accuracy``)."""

from __future__ import annotations

from typing import Any

from ikkuna_core import RunContext, Subscriber, hookimpl
from ikkuna_core.commands import SubscriberFlag

from .subscribers import Loss, TestAccuracy, TrainAccuracy


@hookimpl
def ikkuna_subscribers() -> list[type[Subscriber]]:
    return [TrainAccuracy, TestAccuracy, Loss]


@hookimpl
def ikkuna_subscriber_flags() -> list[SubscriberFlag]:
    return [
        SubscriberFlag("--train-accuracy", "train_accuracy", "accuracy of each training batch"),
        SubscriberFlag(
            "--test-accuracy", "test_accuracy", "accuracy on the run's test data every 100 steps"
        ),
    ]


@hookimpl
def ikkuna_default_subscribers() -> list[dict[str, Any]]:
    # test_accuracy evaluates the whole test set: every 10th step, not every step
    return [
        {"name": "loss"},
        {"name": "train_accuracy"},
        {"name": "test_accuracy", "subsample": 10},
    ]


@hookimpl
def ikkuna_subscriber_options(
    name: str, options: dict[str, Any], context: RunContext
) -> dict[str, Any] | None:
    """test_accuracy without a ``loader`` or ``dataset`` evaluates the run's test loader."""
    if name != TestAccuracy.name or "loader" in options or "dataset" in options:
        return None
    if context.test_loader is None:
        return None
    return {"loader": context.test_loader}
