"""TensorBoard backend: real event files through ``torch.utils.tensorboard.SummaryWriter``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Backend, HistogramRecord, ScalarRecord

__all__ = ["TensorBoardBackend"]


class TensorBoardBackend(Backend):
    """Writes scalars with ``add_scalar`` and histograms with ``add_histogram_raw`` (bins are
    computed on the training device; only they are written).

    Events are handed to the writer's own thread, which writes them to disk every
    ``flush_secs`` seconds and on close; the training thread never waits on a file flush."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, flush_secs: float = 10.0) -> None:
        super().__init__(log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the 'tensorboard' backend needs the tensorboard package: "
                "pip install 'ikkuna-core[tensorboard]'"
            ) from exc
        self.writer: Any = SummaryWriter(
            log_dir=str(self.log_dir), max_queue=10_000, flush_secs=flush_secs
        )

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        add = self.writer.add_scalar
        for r in records:
            add(r.tag, r.value, r.step)

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        for r in records:
            if r.num <= 0:
                continue  # TensorBoard cannot show an empty histogram
            self.writer.add_histogram_raw(
                r.tag,
                min=r.min,
                max=r.max,
                num=r.num,
                sum=r.sum,
                sum_squares=r.sum_squares,
                bucket_limits=r.edges[1:].tolist(),
                bucket_counts=r.counts.tolist(),
                global_step=r.step,
            )

    def write_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Nothing to do per step: the writer's thread flushes every ``flush_secs``."""

    def close(self) -> None:
        self.writer.close()
