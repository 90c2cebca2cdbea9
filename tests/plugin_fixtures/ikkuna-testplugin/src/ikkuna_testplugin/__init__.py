"""A real plugin for the core's tests: one subscriber, one backend, one topic, run hooks."""

from __future__ import annotations

import torch
from pydantic import Field

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend

CALLS: list[str] = []


class ScaledMeanOptions(ik.SubscriberOptions):
    scale: float = Field(default=1.0, gt=0)


class ScaledMean(ik.Subscriber):
    """Mean of a topic's payload times ``scale``."""

    name = "scaled_mean"
    Options = ScaledMeanOptions
    default_topics = ("weights",)

    def compute(self, bundle: ik.MessageBundle) -> None:
        data = bundle[bundle.topics[0]]
        assert isinstance(data, torch.Tensor)
        self.publish_scalar(bundle, data.float().mean() * self.options.scale)


class ListBackend(MemoryBackend):
    name = "memory"


@ik.hookimpl
def ikkuna_subscribers() -> list[type[ik.Subscriber]]:
    return [ScaledMean]


@ik.hookimpl
def ikkuna_backends() -> list[type]:
    return [ListBackend]


@ik.hookimpl
def ikkuna_topics() -> list[ik.TopicSpec]:
    return [ik.TopicSpec(name="curvature", kind="module", doc="test topic")]


@ik.hookimpl
def ikkuna_configure(config: ik.IkkunaConfig) -> None:
    CALLS.append(f"configure:{config.log_dir.name}")


@ik.hookimpl
def ikkuna_run_started(exporter: ik.Exporter) -> None:
    CALLS.append("run_started")


@ik.hookimpl
def ikkuna_run_finished(exporter: ik.Exporter) -> None:
    CALLS.append("run_finished")
