"""The small interface every backend implements: scalars and histograms, already on the
host, written in batches at each flush."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

__all__ = ["Backend", "HistogramRecord", "ScalarRecord"]


class ScalarRecord(NamedTuple):
    """One scalar value of one step, on the host (immutable, cheap to make)."""

    topic: str
    key: str | None
    tag: str
    step: int
    value: float


class HistogramRecord(NamedTuple):
    """One histogram of one step, on the host: ``counts[i]`` values fell in
    ``edges[i]..edges[i + 1]``; ``num`` finite values in all, ``nonfinite`` NaN/inf ones."""

    topic: str
    key: str | None
    tag: str
    step: int
    counts: np.ndarray
    edges: np.ndarray
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    nonfinite: float


class Backend(ABC):
    """Receives batches of host-side records. ``name`` is what the configuration calls it;
    ``files`` are glob patterns, relative to ``log_dir``, of what it writes there (a file or
    a folder), so that a front end can tell a used log directory and replace a run."""

    name: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)

    @abstractmethod
    def write_scalars(self, records: Sequence[ScalarRecord]) -> None: ...

    @abstractmethod
    def write_histograms(self, records: Sequence[HistogramRecord]) -> None: ...

    def write_text(self, tag: str, text: str, step: int) -> None:  # noqa: B027
        """Record a piece of text (Markdown); backends that cannot show text ignore it."""

    def describe_modules(self, modules: Mapping[str, str]) -> None:  # noqa: B027
        """Told the class name of every watched module by key (``{"layer1.0.conv1":
        "Conv2d"}``) once the model is known, to label figures; optional."""

    def flush(self) -> None:  # noqa: B027 - optional for backends that buffer nothing
        """Make what was written so far durable."""

    def close(self) -> None:  # noqa: B027
        """Write everything and release resources."""
