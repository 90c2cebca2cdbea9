"""Two example subscribers: the per-module path (``mean_abs``: options, defaults, a
computation that stays on the device) and the step-level path (``max_abs``: every module's
payloads of a step reduced together, a few kernel launches per step whatever the model)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from ikkuna_core import MessageBundle, StepBundle, Subscriber, SubscriberOptions, ops


class MeanAbsOptions(SubscriberOptions):
    """Options beyond the ones every subscriber has (``topics``, ``subsample``,
    ``publish_as``). Unknown keys are rejected; values are validated by pydantic."""

    power: float = Field(default=1.0, gt=0, description="the mean of |x| ** power")


class MeanAbs(Subscriber):
    """Mean of ``|x| ** power`` over every element of each subscribed topic, per module,
    published as ``mean_abs/<topic>`` (tag ``mean_abs/<topic>/<module>``)."""

    name = "mean_abs"  # what [[ikkuna.subscribers]] name = "..." refers to
    Options = MeanAbsOptions
    default_topics: ClassVar[tuple[str, ...]] = ("weight_gradients",)
    options: MeanAbsOptions

    def compute(self, bundle: MessageBundle) -> None:
        # The payload is a live view of training state: use it now (or clone it to keep it).
        x = bundle[bundle.topics[0]]
        assert x is not None
        value = x.detach().float().abs().pow(self.options.power).mean()
        # Keep the value a tensor: no .item()/.cpu()/float(), so no host synchronisation.
        self.publish_scalar(bundle, value)


class MaxAbs(Subscriber):
    """The largest ``|x|`` of each subscribed topic, per module, published as
    ``max_abs/<topic>`` — written for the step-level path: one call per step with all
    modules' payloads, one fused reduction (``ops.norms`` with p = inf), one message per
    topic. Prefer this shape when a metric reduces every module the same way."""

    name = "max_abs"
    default_topics: ClassVar[tuple[str, ...]] = ("weight_gradients",)
    # Under FSDP2/tensor parallelism the payloads of sharded parameters are this rank's
    # shards, and their maxima merge across the ranks (without, merge_shards publishes at once)
    sharded = "merge"

    def compute_step(self, step: StepBundle) -> None:
        for topic in step.topics:
            payloads = step[topic]  # .keys, .modules and .data: one entry per module
            values = ops.norms(payloads.tensors(), p=float("inf"))  # one value per module

            def publish(merged: torch.Tensor, topic: str = topic) -> None:
                self.publish_scalars(step, merged, topic=topic)  # keys: the topic's keys

            self.merge_shards(step, values, publish, topics=[topic], op="max")
