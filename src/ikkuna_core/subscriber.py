"""Subscriber: the base class a metric plugin subclasses.

A subscriber has a ``name`` (used in the run configuration), declares its options as a
pydantic model (``Options``; every subscriber accepts ``topics`` and ``subsample``),
implements :meth:`Subscriber.compute` and reports with :meth:`Subscriber.publish_scalar` and
:meth:`Subscriber.publish_histogram`. Results are queued for the backends and published on
the bus as new topics that other subscribers can consume.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .messages import EVENT_TOPICS, HistogramMessage, MessageBundle, ScalarMessage

if TYPE_CHECKING:
    from .bus import MessageBus
    from .exporter import Exporter

__all__ = ["Subscriber", "SubscriberOptions", "TensorOptions", "histogram_on_device"]


class SubscriberOptions(BaseModel):
    """Options every subscriber accepts. Subclass it to add your own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topics: list[str] = Field(default_factory=list, description="topics to subscribe to")
    subsample: int = Field(default=1, ge=1, description="only every n-th training step")
    publish_as: str | None = Field(
        default=None, description="name of the topic the results are published under"
    )


class TensorOptions(SubscriberOptions):
    """Options of a subscriber that computes on tensors: event topics (``batch_started``…),
    whose payload is None, are rejected."""

    @field_validator("topics")
    @classmethod
    def _tensor_topics(cls, topics: list[str]) -> list[str]:
        events = [t for t in topics if t in EVENT_TOPICS]
        if events:
            raise ValueError(f"topics {events} carry no tensor payload; choose data topics")
        return topics


class Subscriber:
    """Base class for metric subscribers.

    Subclasses set ``name`` and optionally ``Options``, ``default_topics`` and
    ``synchronized`` (True: one bundle holding all topics per module and step; False: each
    topic is delivered on its own).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SubscriberOptions]] = SubscriberOptions
    default_topics: ClassVar[tuple[str, ...]] = ()
    synchronized: ClassVar[bool] = False

    def __init__(self, **options: object) -> None:
        if not self.name:
            raise TypeError(f"{type(self).__name__} must set the class attribute 'name'")
        if not options.get("topics"):
            options["topics"] = list(self.default_topics)
        try:
            self.options = self.Options(**options)  # type: ignore[arg-type]
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']} (got {e['input']!r})"
                for e in exc.errors()
            )
            raise ValueError(f"invalid options for subscriber {self.name!r}: {details}") from None
        self.enabled = True
        self._bus: MessageBus | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    # ----------------------------------------------------------- for authors
    def compute(self, bundle: MessageBundle) -> None:
        """Turn one bundle into metrics; call ``publish_scalar``/``publish_histogram``."""
        raise NotImplementedError

    def output_topic(self, suffix: str | None = None) -> str:
        """The topic results are published under: ``publish_as`` if given, otherwise the
        subscriber's name followed by its input topics (``norm/weight_gradients``)."""
        base = self.options.publish_as or "/".join([self.name, *self.options.topics])
        return f"{base}/{suffix}" if suffix else base

    def output_topics(self) -> list[str]:
        """Every topic this subscriber may publish; override if you publish suffixes."""
        return list(dict.fromkeys(self._topic_for(t) for t in self.options.topics))

    def _topic_for(self, input_topic: str, suffix: str | None = None) -> str:
        if self.synchronized or self.options.publish_as or len(self.options.topics) <= 1:
            return self.output_topic(suffix)
        base = f"{self.name}/{input_topic}"
        return f"{base}/{suffix}" if suffix else base

    @property
    def bus(self) -> MessageBus:
        if self._bus is None:
            raise RuntimeError(f"subscriber {self.name!r} is not registered on a bus")
        return self._bus

    @property
    def exporter(self) -> Exporter:
        """The Exporter feeding this subscriber's bus (for silent evaluation forwards)."""
        exporter = self.bus.exporter
        if exporter is None:
            raise RuntimeError("this subscriber's bus has no exporter attached")
        return exporter

    def publish_scalar(
        self, bundle: MessageBundle, value: torch.Tensor | float, suffix: str | None = None
    ) -> ScalarMessage:
        """Report a scalar for the bundle's module (or network) and step. Keep ``value`` a
        tensor: it stays on its device until the backends flush."""
        topic = self._topic_for(bundle.topics[0], suffix)
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        msg = ScalarMessage(
            topic=topic,
            global_step=bundle.global_step,
            epoch=bundle.epoch,
            batch_index=bundle.batch_index,
            key=bundle.key,
            tag=topic if bundle.key is None else f"{topic}/{bundle.key}",
            data=value.detach(),
        )
        self.bus.publish_result(msg)
        return msg

    def publish_histogram(
        self,
        bundle: MessageBundle,
        values: torch.Tensor,
        bins: int = 64,
        range: tuple[float, float] | None = None,  # noqa: A002 - mirrors numpy/torch naming
        suffix: str | None = None,
        max_samples: int | None = None,
    ) -> HistogramMessage:
        """Report a histogram of ``values``; the bins are computed on the tensor's device
        (see :func:`histogram_on_device`)."""
        topic = self._topic_for(bundle.topics[0], suffix)
        stats = histogram_on_device(values, bins=bins, range=range, max_samples=max_samples)
        msg = HistogramMessage(
            topic=topic,
            global_step=bundle.global_step,
            epoch=bundle.epoch,
            batch_index=bundle.batch_index,
            key=bundle.key,
            tag=topic if bundle.key is None else f"{topic}/{bundle.key}",
            data=stats["data"],
            edges=stats["edges"],
            min=stats["min"],
            max=stats["max"],
            num=stats["num"],
            sum=stats["sum"],
            sum_squares=stats["sum_squares"],
            nonfinite=stats["nonfinite"],
        )
        self.bus.publish_result(msg)
        return msg

    # -------------------------------------------------------------- plumbing
    def _bind(self, bus: MessageBus) -> None:
        if self._bus is not None and self._bus is not bus:
            raise RuntimeError(f"subscriber {self.name!r} is already registered on another bus")
        self._bus = bus

    def _receive(self, bundle: MessageBundle) -> None:
        try:
            self.compute(bundle)
        except Exception as exc:  # noqa: BLE001 - the bus applies the error policy
            self.bus.subscriber_failed(self, exc)


_SAMPLE_CACHE: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _sample_index(numel: int, k: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random choice of ``k`` of ``numel`` positions, sorted, cached per size
    and device. Its own generator leaves the global RNG (and so training) untouched; unlike
    a stride, it cannot alias with the layout of a feature map."""
    key = (numel, k, device)
    idx = _SAMPLE_CACHE.get(key)
    if idx is None:
        gen = torch.Generator().manual_seed(numel)
        idx = torch.randint(0, numel, (k,), generator=gen).sort().values.to(device)
        if len(_SAMPLE_CACHE) > 512:
            _SAMPLE_CACHE.clear()
        _SAMPLE_CACHE[key] = idx
    return idx


def histogram_on_device(
    values: torch.Tensor,
    bins: int = 64,
    range: tuple[float, float] | None = None,  # noqa: A002
    max_samples: int | None = None,
) -> dict[str, torch.Tensor]:
    """Histogram of the finite entries of ``values`` plus the statistics TensorBoard wants,
    all as tensors on ``values``' device (no host synchronisation). Non-finite entries are
    counted in ``nonfinite``, not binned. With no ``range``, the bins span the finite
    min..max. With ``max_samples``, a larger tensor is summarised by a fixed pseudo-random
    sample of that many entries (``num`` then counts the sample)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if range is not None and not range[0] < range[1]:
        raise ValueError(f"histogram range must be (low, high) with low < high, got {range}")
    x = values.detach().reshape(-1)
    if max_samples is not None and x.numel() > max_samples:
        x = x[_sample_index(x.numel(), max_samples, x.device)]
    if not x.is_floating_point():
        x = x.float()
    if x.device.type == "cpu" and x.numel():
        fast = _histogram_cpu(x, bins, range)
        if fast is not None:
            return fast
    finite = torch.isfinite(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xf = torch.where(finite, x, zero)
    nfin = finite.sum()
    inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    lo_all = torch.where(finite, x, inf).min() if x.numel() else inf
    hi_all = torch.where(finite, x, -inf).max() if x.numel() else -inf
    empty = nfin == 0
    lo_all = torch.where(empty, zero, lo_all)
    hi_all = torch.where(empty, zero, hi_all)
    if range is not None:
        lo = torch.full((), float(range[0]), dtype=torch.float64, device=x.device)
        hi = torch.full((), float(range[1]), dtype=torch.float64, device=x.device)
    else:
        lo = lo_all.to(torch.float64)
        hi = hi_all.to(torch.float64)
        hi = torch.where(hi > lo, hi, lo + 1e-12 + lo.abs() * 1e-6)
    scale = (bins / (hi - lo)).to(x.dtype)
    idx = ((xf - lo.to(x.dtype)) * scale).to(torch.int64).clamp_(0, bins - 1)
    inside = finite if range is None else finite & (xf >= range[0]) & (xf <= range[1])
    counts = torch.zeros(bins, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, idx, inside.to(torch.int64))
    edges = lo + (hi - lo) / bins * torch.arange(bins + 1, dtype=torch.float64, device=x.device)
    return {
        "data": counts,
        "edges": edges,
        "min": lo_all,
        "max": hi_all,
        "num": nfin,
        "sum": xf.sum(),
        "sum_squares": (xf * xf).sum(),
        "nonfinite": x.numel() - nfin,
    }


def _histogram_cpu(
    x: torch.Tensor, bins: int, range: tuple[float, float] | None  # noqa: A002
) -> dict[str, torch.Tensor] | None:
    """On the CPU a host read costs nothing, so one min/max pass decides: all finite (the
    usual case) -> ``torch.histc``, a third of the masked path's cost; otherwise None and
    the general path counts the non-finite values."""
    if x.element_size() < 4:
        x = x.float()  # histc has no half-precision CPU kernel
    lo_t, hi_t = torch.aminmax(x)
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    a, b = range if range is not None else (lo, hi if hi > lo else lo + 1e-12 + abs(lo) * 1e-6)
    counts = torch.histc(x, bins=bins, min=a, max=b).to(torch.int64)
    flat = x.reshape(-1)
    return {
        "data": counts,
        "edges": torch.linspace(a, b, bins + 1, dtype=torch.float64),
        "min": lo_t,
        "max": hi_t,
        "num": torch.tensor(x.numel()),
        "sum": flat.sum(),
        "sum_squares": torch.dot(flat, flat),
        "nonfinite": torch.tensor(0),
    }
