"""The subscribers of the ``histograms`` plugin.

Each subscriber works on a whole step at once: every module's histogram of a topic is one
flat computation on the payloads' device (:func:`ikkuna_core.ops.histograms`); only the
bin counts, the edges and a few statistics ever reach the host, when the backends flush.
Nothing here synchronises with the host.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field, field_validator

from ikkuna_core import ModuleInfo, StepBundle, Subscriber, TensorOptions, ops

__all__ = [
    "DEAD_MODULE_TYPES",
    "DeadFraction",
    "DeadFractionOptions",
    "Histogram",
    "HistogramOptions",
]

#: Activation modules whose output is exactly zero on a whole half-line of inputs, where
#: their gradient is zero too: a zero output there means the unit passes no gradient for that
#: sample. LeakyReLU, PReLU, RReLU, ELU, GELU and SiLU are not here: they are never flat at
#: zero (LeakyReLU exists precisely so that units cannot die).
DEAD_MODULE_TYPES: tuple[str, ...] = ("ReLU", "ReLU6", "Threshold", "Hardsigmoid", "Hardswish")


class HistogramOptions(TensorOptions):
    bins: int = Field(default=64, ge=1, le=100_000, description="number of equal-width bins")
    range: tuple[float, float] | None = Field(
        default=None,
        description="[low, high] of the bins; values outside are not counted. "
        "Omitted: each histogram spans its finite min..max",
    )
    max_samples: int = Field(
        default=16384,
        ge=0,
        description="summarise a tensor with more entries by a fixed pseudo-random sample of "
        "this many (large activations cost a fraction of a millisecond instead of tens; `num` "
        "then counts the sample). 0: every entry is binned",
    )

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None:
            low, high = value
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"range must be [low, high] with finite low < high, got {value}")
        return value


class Histogram(Subscriber):
    """Histogram of every element of each subscribed topic, per module, written to the
    backends' histogram channel (TensorBoard's histograms, the matplotlib backend's
    "colorful dimension" images). NaN and infinite values are not binned; they are counted
    in the record's ``nonfinite`` field. With ``max_samples``, tensors with more entries are
    summarised by a fixed pseudo-random sample of their entries. Published as
    ``histogram/<topic>``."""

    name = "histogram"
    ddp_shareable = True  # one result per key, from that key's payload: DDP ranks split the keys
    Options = HistogramOptions
    default_topics: ClassVar[tuple[str, ...]] = ("activations",)
    sharded = "merge"
    options: HistogramOptions

    def sample_size(self, topic: str) -> int | None:
        """Activations and layer gradients are captured as samples of ``max_samples``
        entries (a copy in the hook, no reference to the whole tensor)."""
        return self.options.max_samples or None

    def compute_step(self, step: StepBundle) -> None:
        # every topic's tensors in one flat computation, then one message per topic
        tensors = [step[topic].tensors() for topic in step.topics]
        flat = [t for group in tensors for t in group]
        sizes = [len(group) for group in tensors]
        if self.merging(step):
            self._merged(step, flat, sizes)
            return
        hists = ops.histograms(
            flat,
            bins=self.options.bins,
            range=self.options.range,
            max_samples=self.options.max_samples or None,
        )
        self._publish(step, hists, sizes)

    def _publish(self, step: StepBundle, hists: ops.Histograms, sizes: list[int]) -> None:
        per_topic = zip(*(field.split(sizes) for field in hists), strict=True)
        for topic, fields in zip(step.topics, per_topic, strict=True):
            self.publish_histograms(step, ops.Histograms(*fields), topic=topic)

    def _merged(self, step: StepBundle, flat: list[torch.Tensor], sizes: list[int]) -> None:
        """Histograms of sharded payloads: the shards agree on each tensor's finite min and
        max (one all-reduce of maxima), bin with those edges, and sum their counts and
        statistics (one of sums). With ``max_samples`` each shard is sampled on its own."""
        samples = self.options.max_samples or None
        bins = self.options.bins

        def counted(limits: tuple[torch.Tensor, torch.Tensor]) -> None:
            hists = ops.histograms(flat, bins=bins, range=self.options.range,
                                   max_samples=samples, limits=limits)
            sums = torch.cat([hists.counts.double(), torch.stack(
                [hists.num.double(), hists.sum, hists.sum_squares, hists.nonfinite.double()],
                dim=1)], dim=1)

            def publish(total: torch.Tensor) -> None:
                counts, num, s1, s2, nonfinite = total.split([bins, 1, 1, 1, 1], dim=1)
                self._publish(step, hists._replace(
                    counts=counts.round().to(torch.int64), num=num[:, 0].round().to(torch.int64),
                    sum=s1[:, 0], sum_squares=s2[:, 0],
                    nonfinite=nonfinite[:, 0].round().to(torch.int64)), sizes)

            self.merge_shards(step, sums, publish)

        def agreed(extremes: torch.Tensor) -> None:
            counted((-extremes[:, 1], extremes[:, 0]))

        self.merge_shards(step, ops.finite_extremes(flat, samples), agreed, op="max")


class DeadFractionOptions(TensorOptions):
    module_types: list[str] = Field(
        default_factory=lambda: list(DEAD_MODULE_TYPES),
        description="class names of the modules to report; an empty list reports every module",
    )
    units: bool = Field(
        default=False,
        description="also publish '<topic>/units': the fraction of units (indices along "
        "unit_dim) that are zero for every sample and position of the batch",
    )
    unit_dim: int = Field(
        default=1, ge=1, description="the unit dimension: channels of (N, C, ...) outputs"
    )


class DeadFraction(Subscriber):
    """Fraction of exactly-zero values of each subscribed topic, per module: for the output
    of a ReLU, the fraction of units that are dead for the batch's samples. By default only
    modules of the types in :data:`DEAD_MODULE_TYPES` are reported (a zero output of a
    Linear or Conv layer means nothing in particular); ``module_types = []`` reports every
    module. With ``units = true`` it also publishes the fraction of units (channels) that
    are zero for the whole batch, under ``dead_fraction/<topic>/units``.

    Only activation modules the Exporter watches are seen: ``torch.nn.functional.relu``
    inside a module's ``forward`` is not a module and cannot be reported on its own.
    """

    name = "dead_fraction"
    ddp_shareable = True  # one result per key, from that key's payload: DDP ranks split the keys
    Options = DeadFractionOptions
    default_topics: ClassVar[tuple[str, ...]] = ("activations",)
    options: DeadFractionOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._types = frozenset(self.options.module_types)
        # zero fractions of shards merge (zeros and entries summed); dead units of a shard
        # need the whole tensor
        self.sharded = "gather" if self.options.units else "merge"

    def output_topics(self) -> list[str]:
        topics = list(self.options.topics)
        if self.options.publish_as:
            topics = topics[:1]
        out = [self._topic_for(t) for t in topics]
        if self.options.units:
            out += [self._topic_for(t, "units") for t in topics]
        return out

    def wants_module(self, module: ModuleInfo) -> bool:
        return not self._types or module.type in self._types

    def _merged(
        self, step: StepBundle, topic: str, chosen: list[int], keys: list[str | None],
        tensors: list[torch.Tensor],
    ) -> None:
        """Zero fractions of sharded payloads: zeros and entries of the shards summed (NaN
        for a tensor without entries, as :func:`ikkuna_core.ops.zero_fractions`)."""
        counts = torch.zeros(len(step[topic]), 2, dtype=torch.float64,
                             device=tensors[0].device)
        counts[ops.constant(chosen, torch.long, counts.device)] = ops.zero_counts(tensors)

        def publish(total: torch.Tensor) -> None:
            rows = total[ops.constant(chosen, torch.long, total.device)]
            self.publish_scalars(step, (rows[:, 0] / rows[:, 1]).float(), keys, topic=topic)

        self.merge_shards(step, counts, publish, topics=[topic])

    def compute_step(self, step: StepBundle) -> None:
        for topic in step.topics:
            payloads = step[topic]
            all_tensors = payloads.tensors()  # a TensorOptions topic: every payload a tensor
            merging = self.merging(step)  # then a shard may be empty on this rank only
            chosen = [
                i for i, (module, x) in enumerate(zip(payloads.modules, all_tensors, strict=True))
                if (merging or x.numel()) and (module is None or self.wants_module(module))
            ]
            if not chosen:
                continue
            keys = [payloads.keys[i] for i in chosen]
            tensors = [all_tensors[i] for i in chosen]
            if merging:
                self._merged(step, topic, chosen, keys, tensors)
                continue
            self.publish_scalars(step, ops.zero_fractions(tensors), keys, topic=topic)
            dim = self.options.unit_dim
            if self.options.units:
                unit_keys, dead = [], []
                for key, x in zip(keys, tensors, strict=True):
                    if x.dim() > dim:
                        units = x.shape[dim]
                        alive = (x != 0).movedim(dim, 0).reshape(units, -1).any(dim=1)
                        dead.append((units - alive.sum()).to(torch.float32) / units)
                        unit_keys.append(key)
                if dead:
                    self.publish_scalars(
                        step, torch.stack(dead), unit_keys, topic=topic, suffix="units"
                    )
