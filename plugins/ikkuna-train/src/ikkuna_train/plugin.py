"""Entry point of the ``train`` plugin (``[project.entry-points.ikkuna] train = ...``): the
``ikkuna train`` and ``ikkuna report`` commands, and the Trainer's own metric topics."""

from __future__ import annotations

from ikkuna_core import TopicSpec, hookimpl
from ikkuna_core.commands import Command

from .cli import REPORT, TRAIN
from .trainer import TRAINER_TOPICS


@hookimpl
def ikkuna_commands() -> list[Command]:
    return [TRAIN, REPORT]


@hookimpl
def ikkuna_topics() -> list[TopicSpec]:
    return [TopicSpec(name=name, kind="network", doc=doc) for name, doc in TRAINER_TOPICS.items()]
