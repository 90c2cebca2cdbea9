"""The ``wandb`` backend: each training step's scalars and histograms in one
``run.log(..., step=step)`` call, histograms as ``wandb.Histogram(np_histogram=...)`` from
Ikkuna's own bins (computed on the training device; nothing is re-binned on the host).

It joins the active ``wandb.run`` when there is one (and leaves it open), and otherwise
starts one with ``project``, ``mode`` (``online``, ``offline``, ``disabled``; default: W&B's
own, i.e. ``WANDB_MODE``) and ``run_name``, its files in ``<log_dir>/wandb``, finished at
close. Under ``torch.distributed`` only rank 0 attaches backends (``ranks = "all"``: every
rank logs its own run).

``watch_names = true`` publishes the histograms of the parameter topics under the names
``wandb.watch(model, log="all")`` uses, so the same W&B panels fill:
``histogram/weights/<module>`` as ``parameters/<module>.weight``,
``histogram/weight_gradients/<module>`` as ``gradients/<module>.weight``, and the same for
biases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ikkuna_core.backends import Backend, HistogramRecord, ScalarRecord

__all__ = ["WATCH_NAMES", "WandbBackend", "watch_name"]

#: Ikkuna histogram topics and the (panel section, parameter suffix) wandb.watch uses.
WATCH_NAMES: dict[str, tuple[str, str]] = {
    "histogram/weights": ("parameters", "weight"),
    "histogram/biases": ("parameters", "bias"),
    "histogram/weight_gradients": ("gradients", "weight"),
    "histogram/bias_gradients": ("gradients", "bias"),
}


def watch_name(topic: str, key: str | None) -> str | None:
    """The name ``wandb.watch(log="all")`` gives the histogram of ``topic`` for module
    ``key`` (``gradients/layer1.0.conv1.weight``), or None when it has none."""
    names = WATCH_NAMES.get(topic)
    if names is None or key is None:
        return None
    section, suffix = names
    return f"{section}/{key}.{suffix}"


class WandbBackend(Backend):
    """Logs to one W&B run (see the module's docstring for which)."""

    name = "wandb"
    #: What a run it starts leaves in ``log_dir`` (a new run there replaces it).
    files = ("wandb",)

    def __init__(
        self,
        log_dir: str | Path,
        project: str | None = None,
        mode: Literal["online", "offline", "disabled"] | None = None,
        run_name: str | None = None,
        watch_names: bool = False,
    ) -> None:
        super().__init__(log_dir)
        if mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"mode must be 'online', 'offline' or 'disabled', got {mode!r}")
        try:
            import wandb
        except ImportError as exc:  # pragma: no cover - a dependency of this distribution
            raise ImportError("the 'wandb' backend needs wandb: pip install wandb") from exc
        self._wandb = wandb
        self.watch_names = watch_names
        if wandb.run is not None:
            self.run: Any = wandb.run
            self.joined = True
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            rank = _rank()
            name = run_name if rank is None or run_name is None else f"{run_name}-rank{rank}"
            try:
                self.run = wandb.init(
                    project=project or "ikkuna", mode=mode, name=name, dir=str(self.log_dir)
                )
            except Exception as exc:  # wandb's UsageError, CommError: no login, no network
                raise ValueError(
                    f"could not start a W&B run ({type(exc).__name__}: {exc}); log in with "
                    "`wandb login`, or log without an account: mode = \"offline\" (or "
                    "WANDB_MODE=offline)"
                ) from exc
            self.joined = False
        self._steps: dict[int, dict[str, Any]] = {}
        self._closed = False

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        steps = self._steps
        for r in records:
            row = steps.get(r.step)
            if row is None:
                row = steps[r.step] = {}
            row[r.tag] = r.value

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        histogram, steps = self._wandb.Histogram, self._steps
        for r in records:
            row = steps.get(r.step)
            if row is None:
                row = steps[r.step] = {}
            name = (watch_name(r.topic, r.key) if self.watch_names else None) or r.tag
            counts = np.asarray(r.counts, dtype=np.float64)
            row[name] = histogram(np_histogram=(counts, np.asarray(r.edges, dtype=np.float64)))

    def write_text(self, tag: str, text: str, step: int) -> None:
        self.run.summary[f"text/{tag}"] = text

    def log_config(self, config: Any) -> None:
        """The run configuration (an IkkunaConfig) as ``run.config["ikkuna"]``."""
        dumped = config.model_dump(mode="json", exclude={"subscribers"})
        dumped["subscribers"] = [
            {"name": e.name, **dict(e.options)} for e in getattr(config, "subscribers", [])
        ]
        self.run.config.update({"ikkuna": dumped}, allow_val_change=True)

    def describe_modules(self, modules: Any) -> None:
        self.run.summary["ikkuna/modules"] = len(modules)

    def flush(self) -> None:
        steps, self._steps = self._steps, {}
        for step in sorted(steps):  # W&B drops a step lower than one already logged
            self.run.log(steps[step], step=step)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        if not self.joined:
            self.run.finish()


def _rank() -> int | None:
    """This process's rank in a distributed run with more than one process, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None
