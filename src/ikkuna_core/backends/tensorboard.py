"""TensorBoard backend: real event files, written by Ikkuna's own record writer with a C
CRC32C (``google-crc32c``), one event per step holding every scalar and histogram of that
step.

Scalars and histograms are encoded straight into the wire format of TensorBoard's ``Event``,
``Summary`` and ``HistogramProto`` messages (a few ``struct.pack`` calls and one
``ndarray.tobytes()`` per bucket array, instead of building a proto object per value, which
cost ~50 µs per histogram); the file header and text summaries use the protos themselves.
The tests parse what is written with TensorBoard's protos and its ``EventAccumulator``."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import os
import socket
import struct
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .base import Backend, HistogramRecord, ScalarRecord
from .heatmap import HEATMAP_MODULES, StepGrid, heatmap_png

__all__ = [
    "EventFileWriter",
    "TensorBoardBackend",
    "encode_event",
    "encode_histogram",
    "encode_scalar",
]

_FILE_IDS = itertools.count()
_DOUBLES5 = struct.Struct("<" + "Bd" * 5)  # min, max, num, sum, sum_squares with their keys


@functools.lru_cache(maxsize=4096)
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(key: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return bytes((key,)) + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=65536)
def _scalar_prefix(tag: str) -> bytes:
    """Everything of a summary's value entry ``Summary.value`` (field 1) holding
    ``Value(tag=tag, simple_value=...)`` but the 4 bytes of the value: the entry's key and
    length, the tag (field 1), the key of simple_value (field 2, a 32-bit float)."""
    value = _field(0x0A, tag.encode()) + b"\x15"
    return b"\x0A" + _varint(len(value) + 4) + value


@functools.lru_cache(maxsize=65536)
def _histogram_prefix(tag: str, bins: int) -> tuple[bytes, bytes, bytes]:
    """The fixed parts of a summary's value entry holding ``Value(tag=tag,
    histo=HistogramProto(...))`` with ``bins`` buckets: (entry key, length, tag and the histo
    key and length; the bucket_limit key and length; the bucket key and length). In the
    histogram, min..sum_squares are fields 1-5 (doubles), bucket_limit 6 and bucket 7 (packed
    doubles)."""
    packed = _varint(8 * bins)
    histo_len = _DOUBLES5.size + 2 * (1 + len(packed) + 8 * bins)
    value = _field(0x0A, tag.encode()) + b"\x2A" + _varint(histo_len)
    head = b"\x0A" + _varint(len(value) + histo_len) + value
    return head, b"\x32" + packed, b"\x3A" + packed


def _f64(values: np.ndarray) -> bytes:
    if values.dtype != np.float64 or not values.flags.c_contiguous:
        values = np.ascontiguousarray(values, dtype=np.float64)
    return values.tobytes()  # little-endian on every platform torch runs on


def encode_scalar(tag: str, value: float) -> bytes:
    """A ``Summary.value`` entry: ``Value(tag=tag, simple_value=value)``."""
    return _scalar_prefix(tag) + struct.pack("<f", value)


def encode_histogram(tag: str, r: HistogramRecord) -> bytes:
    """A ``Summary.value`` entry: ``Value(tag=tag, histo=HistogramProto(...))``."""
    bins = len(r.counts)
    head, limits_key, counts_key = _histogram_prefix(tag, bins)
    stats = _DOUBLES5.pack(0x09, r.min, 0x11, r.max, 0x19, r.num, 0x21, r.sum, 0x29, r.sum_squares)
    return b"".join((head, stats, limits_key, _f64(r.edges[1:]), counts_key, _f64(r.counts)))


def encode_event(step: int, wall_time: float, values: Sequence[bytes]) -> bytes:
    """``Event(wall_time=..., step=..., summary=Summary(value=[...]))`` from encoded value
    entries: wall_time = field 1 (double), step = 2 (varint), summary = 5."""
    summary = b"".join(values)
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _field(0x2A, summary)


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
        """Hand the buffered bytes to the operating system."""
        self._file.flush()

    def sync(self) -> None:
        """Flush, then ask the operating system to put the file on the disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


class TensorBoardBackend(Backend):
    """Writes each step's scalars (``simple_value``) and histograms (``HistogramProto``, bins
    computed on the training device) as one event. Events reach the operating system at each
    bus flush (``flush_every`` steps) and are synced to the disk every ``flush_secs`` seconds
    and on close. With ``heatmaps`` (default), each per-module metric of more than 12 modules
    is also written at close as one depth x step image, ``heatmap/<topic>``."""

    name = "tensorboard"
    files = ("events.out.tfevents.*",)

    def __init__(
        self, log_dir: str | Path, flush_secs: float = 10.0, heatmaps: bool = True
    ) -> None:
        super().__init__(log_dir)
        try:
            from tensorboard.compat.proto import event_pb2
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the 'tensorboard' backend needs the tensorboard package: "
                "pip install 'ikkuna-core[tensorboard]'"
            ) from exc
        self._event_pb2 = event_pb2
        self.flush_secs = flush_secs
        self.writer = EventFileWriter(self.log_dir)
        self._values: dict[int, list[bytes]] = {}
        self._last_sync = time.monotonic()
        # Depth x step heatmaps of per-module metrics, as images at close (needs matplotlib)
        self._grids: dict[str, StepGrid] | None = (
            {} if heatmaps and importlib.util.find_spec("matplotlib") else None
        )
        self._module_types: dict[str, str] = {}
        self._reopened = False  # the event file was removed once and re-created
        self._last_step = 0

    def describe_modules(self, modules: Mapping[str, str]) -> None:
        self._module_types = dict(modules)

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        values = self._values
        for r in records:
            values.setdefault(r.step, []).append(encode_scalar(r.tag, r.value))
        if self._grids is not None and self._module_types and records:
            grids, modules = self._grids, self._module_types
            for r in records:
                if r.key in modules:
                    grid = grids.get(r.topic)
                    if grid is None:
                        grid = grids[r.topic] = StepGrid()
                    grid.add(r.key, r.step, r.value)  # type: ignore[arg-type]
            self._last_step = max(self._last_step, records[-1].step)

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        values = self._values
        for r in records:
            values.setdefault(r.step, []).append(encode_histogram(r.tag, r))

    def write_text(self, tag: str, text: str, step: int) -> None:
        from torch.utils.tensorboard.summary import text as text_summary

        summary = text_summary(tag, text)
        event = self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
        self.writer.write(event.SerializeToString())

    def flush(self) -> None:
        """One event per step written so far, handed to the operating system (a crash or a
        kill of the process loses none of it); ``os.fsync`` every ``flush_secs`` (a crash of
        the machine)."""
        if self._values:
            if not self.writer.path.exists():
                self._reopen(min(self._values))
            now = time.time()
            for step in sorted(self._values):
                self.writer.write(encode_event(step, now, self._values[step]))
            self._values.clear()
        self.writer.flush()
        if time.monotonic() - self._last_sync >= self.flush_secs:
            self.writer.sync()
            self._last_sync = time.monotonic()

    def _reopen(self, step: int) -> None:
        """The event file is gone (its directory removed during the run): say so once, then
        re-create the directory and go on in a new file, instead of writing into a removed
        one that nobody can read."""
        if not self._reopened:
            warnings.warn(
                f"ikkuna: the TensorBoard event file {self.writer.path} was removed during the "
                f"run (noticed at step {step}); {self.log_dir} is re-created and the events "
                "from this step on go to a new file there (the earlier ones were in the "
                "removed file)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._reopened = True
        with contextlib.suppress(OSError):
            self.writer.close()
        self.writer = EventFileWriter(self.log_dir)

    def close(self) -> None:
        try:
            self.flush()
            self._write_heatmaps()
        finally:
            self.writer.close()

    def _write_heatmaps(self) -> None:
        """One image ``heatmap/<topic>`` per per-module metric of more than
        :data:`~ikkuna_core.backends.heatmap.HEATMAP_MODULES` modules (TensorBoard's IMAGES
        tab), in one event at the last step."""
        if not self._grids:
            return
        from tensorboard.compat.proto import summary_pb2
        values = []
        for topic, grid in sorted(self._grids.items()):
            if len(grid.keys) <= HEATMAP_MODULES:
                continue
            png = heatmap_png(topic, grid, module_types=self._module_types)
            width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR chunk
            image = summary_pb2.Summary.Image(
                height=height, width=width, colorspace=4, encoded_image_string=png
            )
            values.append(summary_pb2.Summary.Value(tag=f"heatmap/{topic}", image=image))
        if values:
            event = self._event_pb2.Event(
                wall_time=time.time(), step=self._last_step,
                summary=summary_pb2.Summary(value=values),
            )
            self.writer.write(event.SerializeToString())
