"""An example backend, ``jsonl``: every scalar as one JSON line of ``<log_dir>/metrics.jsonl``
(histograms as their summary), the shape of a backend for any store a team already uses."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TextIO

from pydantic import Field

from ikkuna_core import Backend, HistogramRecord, ScalarRecord


class JsonLinesBackend(Backend):
    """One line per scalar, ``{"tag", "topic", "key", "step", "value"}``, and per histogram
    ``{"tag", ..., "min", "max", "mean", "num"}``. Lines are buffered and written at each
    flush; the file is fsync'ed every ``sync_every`` flushes and at close."""

    name = "jsonl"  # what backends = ["jsonl"] and ikkuna train -v jsonl refer to
    files = ("metrics.jsonl",)  # so a new run in this log_dir replaces it (--overwrite)

    # Options come from [ikkuna.backend_options.jsonl] as keyword arguments; their type
    # hints are checked before any backend is made, so a bad value names its key.
    def __init__(
        self, log_dir: str | Path, sync_every: Annotated[int, Field(ge=1)] = 100
    ) -> None:
        super().__init__(log_dir)  # log_dir may not exist yet: create what you write
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - close()
        self.sync_every = sync_every
        self._lines: list[str] = []
        self._flushes = 0

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        # Called at each flush with every scalar since the last one, already on the host.
        for r in records:
            self._lines.append(json.dumps(
                {"tag": r.tag, "topic": r.topic, "key": r.key, "step": r.step, "value": r.value}
            ))

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        for r in records:
            mean = r.sum / r.num if r.num else None
            self._lines.append(json.dumps(
                {"tag": r.tag, "topic": r.topic, "key": r.key, "step": r.step,
                 "min": r.min, "max": r.max, "mean": mean, "num": r.num}
            ))

    def flush(self) -> None:
        # Called after write_scalars/write_histograms of each flush.
        if self._lines:
            self._file.write("\n".join(self._lines) + "\n")
            self._lines.clear()
        self._flushes += 1
        if self._flushes % self.sync_every == 0:
            self._file.flush()

    def close(self) -> None:
        # Called once, when the Exporter closes, after a last flush.
        self.flush()
        self._file.close()
