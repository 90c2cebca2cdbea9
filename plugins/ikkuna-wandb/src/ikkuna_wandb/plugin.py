"""Entry point of the ``wandb`` plugin (``[project.entry-points.ikkuna] wandb = ...``)."""

from __future__ import annotations

from ikkuna_core import Exporter, hookimpl
from ikkuna_core.backends import Backend

from .backend import WandbBackend


@hookimpl
def ikkuna_backends() -> list[type[Backend]]:
    return [WandbBackend]


@hookimpl
def ikkuna_run_started(exporter: Exporter) -> None:
    """Give each W&B backend of the run its configuration (``run.config["ikkuna"]``)."""
    if exporter.config is None:
        return
    for backend in exporter.bus.backends:
        if isinstance(backend, WandbBackend):
            backend.log_config(exporter.config)
