"""TensorBoard backend: real event files, written by Ikkuna's own record writer with
TensorBoard's protos and a C CRC32C (``google-crc32c``), one event per step holding every
scalar and histogram of that step."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .base import Backend, HistogramRecord, ScalarRecord

__all__ = ["EventFileWriter", "TensorBoardBackend"]

_FILE_IDS = itertools.count()


def _crc32c() -> Callable[[bytes], int]:
    try:
        import google_crc32c

        return google_crc32c.value  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - the tensorboard extra installs it
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

        warnings.warn(
            "ikkuna: google-crc32c is not installed; TensorBoard records are checksummed in "
            "pure Python, which is slow: pip install 'ikkuna-core[tensorboard]'",
            RuntimeWarning,
            stacklevel=3,
        )
        return crc32c  # type: ignore[no-any-return]


class EventFileWriter:
    """Appends TFRecord-framed events to one ``events.out.tfevents.*`` file: a little-endian
    length, the masked CRC32C of the length, the event bytes, the masked CRC32C of the bytes
    (the format TensorBoard reads)."""

    def __init__(self, log_dir: str | Path, filename_suffix: str = "") -> None:
        from tensorboard.compat.proto import event_pb2

        self._crc = _crc32c()
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_IDS)}{filename_suffix}"
        )
        self.path = directory / name
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        event = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        self.write(event.SerializeToString())
        self._file.flush()

    def _masked(self, data: bytes) -> bytes:
        crc = self._crc(data)
        return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + self._masked(header) + data + self._masked(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


class TensorBoardBackend(Backend):
    """Writes each step's scalars (``simple_value``) and histograms (``HistogramProto``, bins
    computed on the training device) as one event. Events reach the file at each bus flush
    and the disk every ``flush_secs`` seconds and on close."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, flush_secs: float = 10.0) -> None:
        super().__init__(log_dir)
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the 'tensorboard' backend needs the tensorboard package: "
                "pip install 'ikkuna-core[tensorboard]'"
            ) from exc
        self._event_pb2 = event_pb2
        self._summary_pb2 = summary_pb2
        self.flush_secs = flush_secs
        self.writer = EventFileWriter(self.log_dir)
        self._values: dict[int, list[Any]] = {}
        self._last_sync = time.monotonic()

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        value = self._summary_pb2.Summary.Value
        for r in records:
            self._values.setdefault(r.step, []).append(value(tag=r.tag, simple_value=r.value))

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        value = self._summary_pb2.Summary.Value
        proto = self._summary_pb2.HistogramProto
        for r in records:
            histo = proto(
                min=r.min,
                max=r.max,
                num=r.num,
                sum=r.sum,
                sum_squares=r.sum_squares,
                bucket_limit=r.edges[1:].tolist(),
                bucket=r.counts.tolist(),
            )
            self._values.setdefault(r.step, []).append(value(tag=r.tag, histo=histo))

    def write_text(self, tag: str, text: str, step: int) -> None:
        from torch.utils.tensorboard.summary import text as text_summary

        summary = text_summary(tag, text)
        event = self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
        self.writer.write(event.SerializeToString())

    def flush(self) -> None:
        """One event per step written so far; the file reaches the disk every
        ``flush_secs``."""
        if self._values:
            now = time.time()
            summary, event = self._summary_pb2.Summary, self._event_pb2.Event
            for step in sorted(self._values):
                values = self._values[step]
                data = event(wall_time=now, step=step, summary=summary(value=values))
                self.writer.write(data.SerializeToString())
            self._values.clear()
        if time.monotonic() - self._last_sync >= self.flush_secs:
            self.writer.flush()
            self._last_sync = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.writer.close()
