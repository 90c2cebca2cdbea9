"""Entry point of the ``mlflow`` plugin (``[project.entry-points.ikkuna] mlflow = ...``)."""

from __future__ import annotations

from ikkuna_core import Exporter, hookimpl
from ikkuna_core.backends import Backend

from .backend import MlflowBackend


@hookimpl
def ikkuna_backends() -> list[type[Backend]]:
    return [MlflowBackend]


@hookimpl
def ikkuna_run_started(exporter: Exporter) -> None:
    """Give each MLflow backend of the run its configuration, logged as params."""
    if exporter.config is None:
        return
    for backend in exporter.bus.backends:
        if isinstance(backend, MlflowBackend):
            backend.log_config(exporter.config)
