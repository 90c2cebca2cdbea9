"""``spikes``: a step whose loss, or a module's gradient or update norm, jumps far above
its own running level.

Per key (the loss, each module's gradient, each update) the log of the L2 norm is compared
with a running level and a running absolute deviation (exponential averages, on the
device); a value more than ``threshold`` deviations above the level is a spike, and enters
the statistics clipped to that bound (a winsorised update: one spike does not move them, a
lasting change of level does, slowly). The host reads one flag per step; only at a flagged
step are the values read and the spike reported, naming the module that spiked first in
the episode (update-norm spikes tend to come before loss spikes)."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal

import torch
from pydantic import Field

from ikkuna_core import StepBundle, Subscriber, TensorOptions, ops

from ._host import HostReader

__all__ = ["SpikeOptions", "Spikes"]

#: The smallest deviation of a log-norm (a 5% change is never a spike by itself).
_FLOOR = 0.05
#: Pipeline position of a topic within a step: what is computed first spiked first.
_STAGE = {"loss": 0, "layer_gradients": 1, "weight_gradients": 2, "bias_gradients": 2,
          "weight_updates": 3, "bias_updates": 3}


class SpikeOptions(TensorOptions):
    """Options of ``spikes``."""

    topics: list[str] = Field(
        default_factory=lambda: ["loss", "weight_gradients", "weight_updates"]
    )
    threshold: float = Field(
        default=6.0, gt=0,
        description="a spike: the log-norm this many running deviations above its level",
    )
    warmup: int = Field(default=20, ge=1, description="steps that only feed the statistics")
    smoothing: float = Field(
        default=0.98, gt=0, lt=1, description="weight of the past in the running statistics"
    )


class Spikes(Subscriber):
    """Flags norm spikes: a RuntimeWarning naming the module, topic and step (and the one
    that spiked first in the episode), and records ``spikes/<topic>/<key>`` (the deviation)."""

    name = "spikes"
    Options = SpikeOptions
    default_topics = ("loss", "weight_gradients", "weight_updates")
    output_kind: ClassVar[Literal["module", "network"] | None] = "network"
    options: SpikeOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.spikes: list[tuple[int, str, str | None, float]] = []  # (step, topic, key, z)
        self._labels: list[tuple[str, str | None]] = []
        self._level: torch.Tensor | None = None
        self._deviation: torch.Tensor | None = None
        self._seen = 0
        self._first: tuple[int, str, str | None] | None = None  # the episode's first spike
        self._last_spike = -1
        self._host: HostReader[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = HostReader()

    def output_topic(self, suffix: str | None = None) -> str:
        base = self.options.publish_as or self.name
        return f"{base}/{suffix}" if suffix else base

    def output_topics(self) -> list[str]:
        return [self.output_topic()]

    def compute_step(self, step: StepBundle) -> None:
        tensors: list[torch.Tensor] = []
        labels: list[tuple[str, str | None]] = []
        for topic in step.topics:
            payloads = step[topic]
            for key, data in zip(payloads.keys, payloads.data, strict=True):
                if data is not None and data.is_floating_point() and data.numel():
                    tensors.append(data)
                    labels.append((topic, key))
        if not tensors:
            return
        x = ops.norms(tensors).clamp_min(1e-30).log()
        if labels != self._labels or self._level is None or self._deviation is None:
            self._labels, self._seen = labels, 1  # new keys: the statistics start again
            self._level, self._deviation = x, torch.zeros_like(x)
            return
        level, deviation = self._level, self._deviation
        self._seen += 1
        weight = max(1.0 / self._seen, 1.0 - self.options.smoothing)
        dev = x - level
        bound = (deviation + _FLOOR) * self.options.threshold
        keep = dev < bound  # a NaN (a non-finite norm) is never kept
        level.lerp_(torch.where(keep, x, level + bound), weight)
        deviation.lerp_(torch.where(keep, dev.abs(), bound), weight)
        if self._seen <= self.options.warmup:
            return
        # on an accelerator the flag is read once its asynchronous copy has arrived
        for calm, (at, deviations) in self._host.put(keep.all(), (step.global_step, (dev, bound))):
            if not calm:
                self._report(step, at, deviations)

    def _report(self, step: StepBundle, at: int,
                deviations: tuple[torch.Tensor, torch.Tensor]) -> None:
        dev, bound = deviations
        threshold = self.options.threshold
        z = (dev / bound * threshold).tolist()  # in running deviations
        found = [
            (topic, key, value) for (topic, key), value in zip(self._labels, z, strict=True)
            if math.isfinite(value) and value >= threshold
        ]
        if not found:
            return  # only non-finite norms: nonfinite's business
        if self._first is None or at - self._last_spike > self.options.warmup:
            topic, key, _ = min(found, key=lambda f: (_STAGE.get(f[0], 4), -f[2]))
            self._first = (at, topic, key)
        self._last_spike = at
        first_step, first_topic, first_key = self._first
        self.publish_scalars(
            step, torch.tensor([v for _, _, v in found]),
            keys=[f"{t}/{k}" if k is not None else t for t, k, _ in found],
        )
        for topic, key, value in found:
            self.spikes.append((at, topic, key, value))
        topic, key, value = min(found, key=lambda f: (_STAGE.get(f[0], 4), -f[2]))
        what = "the loss" if key is None else f"{key!r}"
        first = "the loss" if first_key is None else f"{first_key!r}"
        warnings.warn(
            f"ikkuna health: step {at}: spike of {what} (topic {topic!r}): its norm is "
            f"{value:.1f} running deviations above its level"
            + (f", and {len(found) - 1} more" if len(found) > 1 else "")
            + f"; the first to spike in this episode: {first} (topic {first_topic!r}) at step "
            f"{first_step}",
            RuntimeWarning,
            stacklevel=2,
        )
