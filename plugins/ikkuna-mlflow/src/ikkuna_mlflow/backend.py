"""The ``mlflow`` backend: a run's scalars as MLflow metrics, its histograms as summary
metrics, its configuration as params and, at close, its depth x step pictures as artifacts.

Where it logs, first match wins: the ``tracking_uri`` option; the active MLflow run of this
process (``mlflow.start_run()`` before training: the backend joins it and leaves it open);
``MLFLOW_TRACKING_URI``; otherwise a local store inside ``log_dir`` (``mlflow.db`` and
``mlartifacts/``: ``mlflow ui --backend-store-uri sqlite:///<log_dir>/mlflow.db``).
Under ``torch.distributed`` only rank 0 attaches backends, unless ``ranks = "all"``:
then each rank logs its own run, named and tagged with its rank.

Metrics go out once per flush in ``MlflowClient.log_batch`` calls (at most 1000 metrics
each, MLflow's limit), asynchronously unless ``synchronous = true``, so training does not
wait for the store; close waits for every batch and raises if one failed.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from ikkuna_core.backends import Backend, HistogramRecord, ScalarRecord
from ikkuna_core.backends.heatmap import StepGrid, heatmap_png

__all__ = ["MlflowBackend", "histogram_quantiles"]

#: MLflow's limit on the entities of one log_batch call.
_BATCH = 1000
#: MLflow's limit on a param's value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_PARAM_LENGTH = 6000
#: Batches that may be in flight before a flush waits for the oldest (bounds memory).
_IN_FLIGHT = 16
_BAD_NAME = re.compile(r"[^\w\-./ :]")


def histogram_quantiles(r: HistogramRecord, quantiles: Sequence[float]) -> np.ndarray:
    """The ``quantiles`` of the values a histogram record counts, read from its bins: the
    cumulative counts interpolated linearly inside each bin (exact to within a bin's
    width), clipped to the record's min and max. NaN for an empty histogram."""
    counts = np.asarray(r.counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return np.full(len(quantiles), np.nan)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    edges = np.asarray(r.edges, dtype=np.float64)
    targets = np.asarray(quantiles, dtype=np.float64) * total
    # the first edge whose cumulative count reaches the target, inside its bin linearly
    right = np.clip(np.searchsorted(cumulative, targets, side="left"), 1, len(edges) - 1)
    below, inside = cumulative[right - 1], counts[right - 1]
    fraction = np.divide(
        targets - below, inside, out=np.zeros_like(targets), where=inside > 0
    )
    values = edges[right - 1] + fraction * (edges[right] - edges[right - 1])
    return np.clip(values, r.min, r.max)


def metric_name(tag: str) -> str:
    """``tag`` as a valid MLflow metric name (letters, digits, ``_-./ :``; others become
    ``_``)."""
    return _BAD_NAME.sub("_", tag).replace("..", "_.").lstrip("/") or "_"


class MlflowBackend(Backend):
    """Logs to one MLflow run (see the module's docstring for which). ``quantiles`` are the
    histogram summaries logged per histogram besides min, max, mean and std (as
    ``<tag>/p50`` and so on); ``heatmaps`` logs a depth x step PNG per per-module metric
    at close (``heatmaps/<topic>.png``)."""

    name = "mlflow"
    #: What the local store leaves in ``log_dir`` (a new run there replaces them).
    files = ("mlflow.db", "mlartifacts")

    def __init__(
        self,
        log_dir: str | Path,
        tracking_uri: str | None = None,
        experiment: Annotated[str, Field(min_length=1)] = "ikkuna",
        run_name: str | None = None,
        quantiles: list[Annotated[float, Field(gt=0, lt=1)]] | None = None,
        heatmaps: bool = True,
        synchronous: bool = False,
    ) -> None:
        super().__init__(log_dir)
        qs = [0.05, 0.25, 0.5, 0.75, 0.95] if quantiles is None else list(quantiles)
        for q in qs:
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
                raise ValueError(f"quantiles must be numbers between 0 and 1, got {q!r}")
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:  # pragma: no cover - a dependency of this distribution
            raise ImportError("the 'mlflow' backend needs mlflow: pip install mlflow") from exc
        self._Metric = Metric
        self.quantiles = qs
        self.heatmaps = heatmaps
        self.synchronous = synchronous
        rank, world = _rank()
        active = mlflow.active_run()
        if active is not None and tracking_uri in (None, mlflow.get_tracking_uri()):
            self.tracking_uri = mlflow.get_tracking_uri()
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.run_id: str = active.info.run_id
            self.joined = True
            self._local = False
        else:
            artifacts = None
            self._local = False
            if tracking_uri is not None:
                uri = tracking_uri
            elif os.environ.get("MLFLOW_TRACKING_URI"):
                uri = os.environ["MLFLOW_TRACKING_URI"]
            else:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                uri = f"sqlite:///{(self.log_dir / 'mlflow.db').absolute()}"
                artifacts = (self.log_dir / "mlartifacts").absolute().as_uri()
                self._local = True
            self.tracking_uri = uri
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifacts)
            )
            name = run_name if world == 1 or run_name is None else f"{run_name}-rank{rank}"
            run = self.client.create_run(
                experiment_id, run_name=name, tags={"ikkuna.rank": str(rank)}
            )
            self.run_id = run.info.run_id
            self.joined = False
        self._pending: list[Any] = []
        self._in_flight: list[Any] = []
        self._grids: dict[str, StepGrid] = {}
        self._module_types: dict[str, str] = {}
        self._closed = False

    # ------------------------------------------------------------------ records
    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        stamp = int(time.time() * 1000)
        metric, pending = self._Metric, self._pending
        modules, grids = self._module_types, self._grids
        for r in records:
            pending.append(metric(metric_name(r.tag), float(r.value), stamp, r.step))
            if r.key in modules:
                grid = grids.get(r.topic)
                if grid is None:
                    grid = grids[r.topic] = StepGrid()
                grid.add(r.key, r.step, float(r.value))  # type: ignore[arg-type]

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        stamp = int(time.time() * 1000)
        metric, pending = self._Metric, self._pending
        labels = [f"p{round(100 * q):02d}" for q in self.quantiles]
        for r in records:
            base = metric_name(r.tag)
            stats: list[tuple[str, float]] = [("nonfinite", float(r.nonfinite))]
            if r.num > 0:
                mean = r.sum / r.num
                std = math.sqrt(max(r.sum_squares / r.num - mean * mean, 0.0))
                stats += [("min", r.min), ("max", r.max), ("mean", mean), ("std", std)]
                values = histogram_quantiles(r, self.quantiles)
                stats += zip(labels, values.tolist(), strict=True)
            for suffix, value in stats:
                pending.append(metric(f"{base}/{suffix}", float(value), stamp, r.step))

    def write_text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"text/{metric_name(tag)}.md")

    def describe_modules(self, modules: Mapping[str, str]) -> None:
        self._module_types = dict(modules)
        kinds: dict[str, int] = {}
        for kind in modules.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        self._set_tags(
            {
                "ikkuna.model.modules": str(len(modules)),
                "ikkuna.model.module_types": json.dumps(kinds, sort_keys=True),
            }
        )

    def log_config(self, config: Any) -> None:
        """The run configuration (an IkkunaConfig) as params ``ikkuna.<key>``; the
        ``ikkuna_run_started`` hook of this plugin calls it."""
        dumped = config.model_dump(mode="json", exclude={"subscribers"})
        dumped["subscribers"] = [
            {"name": e.name, **dict(e.options)} for e in getattr(config, "subscribers", [])
        ]
        params = {
            f"ikkuna.{key}": _text(value)[:_PARAM_LENGTH] for key, value in dumped.items()
        }
        from mlflow.entities import Param

        try:
            self.client.log_batch(
                self.run_id, params=[Param(k, v) for k, v in sorted(params.items())]
            )
        except Exception as exc:  # noqa: BLE001 - a joined run may hold other values
            warnings.warn(
                f"ikkuna: mlflow backend: the run configuration was not logged as params "
                f"({type(exc).__name__}: {exc})",
                RuntimeWarning,
                stacklevel=2,
            )

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    # ---------------------------------------------------------------- lifecycle
    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), _BATCH):
            chunk = pending[start : start + _BATCH]
            operation = self.client.log_batch(
                self.run_id, metrics=chunk, synchronous=self.synchronous
            )
            if operation is not None and not self.synchronous:
                self._in_flight.append(operation)
        while len(self._in_flight) > _IN_FLIGHT:
            self._in_flight.pop(0).wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        in_flight, self._in_flight = self._in_flight, []
        for operation in in_flight:
            operation.wait()  # raises if a batch failed
        with tempfile.TemporaryDirectory(prefix="ikkuna-mlflow-") as tmp:
            if self._module_types:
                path = Path(tmp) / "modules.json"
                path.write_text(json.dumps(self._module_types, indent=1) + "\n")
                self.client.log_artifact(self.run_id, str(path), artifact_path="ikkuna")
            if self.heatmaps and self._grids:
                folder = Path(tmp) / "heatmaps"
                folder.mkdir()
                for topic, grid in sorted(self._grids.items()):
                    png = heatmap_png(topic, grid, module_types=self._module_types)
                    (folder / f"{metric_name(topic).replace('/', '__')}.png").write_bytes(png)
                self.client.log_artifacts(self.run_id, str(folder), artifact_path="heatmaps")
        if not self.joined:
            self.client.set_terminated(self.run_id)
        if self._local:
            _release_local_store(self.tracking_uri)


def _release_local_store(uri: str) -> None:
    """Forget MLflow's in-process caches of the local sqlite store ``uri`` (its engine and
    store object), so that a later run of this process that replaces the file (a new run in
    the same log_dir, ``--overwrite``) opens the new file, not a cached connection to the
    deleted one. Best effort: these are MLflow internals."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    except ImportError:  # pragma: no cover - another MLflow layout
        return
    engines = getattr(SqlAlchemyStore, "_engine_map", {})
    engine = engines.pop(uri, None)
    if engine is not None:
        engine.dispose()
    cached = getattr(type(_tracking_store_registry), "_get_store_with_resolved_uri", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=repr, sort_keys=True)


def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
