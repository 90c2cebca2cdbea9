"""A real plugin for the core's tests: one subscriber, one backend, one topic, a command, a
flag, default subscribers, run hooks (every hook of ikkuna_core.hookspecs)."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from pydantic import Field

import ikkuna_core as ik
from ikkuna_core.commands import CLIError, Command, SubscriberFlag
from ikkuna_core.plugins import PluginRegistry
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


def _configure_hello(parser: argparse.ArgumentParser, registry: PluginRegistry) -> None:
    parser.add_argument("who", help="whom to greet")
    parser.add_argument("--times", type=int, default=1)


def _hello(args: argparse.Namespace) -> int:
    if args.times < 1:
        raise CLIError(f"--times must be >= 1, got {args.times}")
    for _ in range(args.times):
        print(f"hello {args.who}")
    return 0


@ik.hookimpl
def ikkuna_commands() -> list[Command]:
    return [Command("hello", "greet someone (a test plugin's command)", _configure_hello, _hello)]


@ik.hookimpl
def ikkuna_subscriber_flags() -> list[SubscriberFlag]:
    return [SubscriberFlag("--scaled-mean", "scaled_mean", "mean of the weights, times 2",
                           {"topics": ["weights"], "scale": 2.0})]


@ik.hookimpl
def ikkuna_default_subscribers() -> list[dict[str, Any]]:
    return [{"name": "scaled_mean", "topics": ["weights"]}]


@ik.hookimpl
def ikkuna_subscriber_options(
    name: str, options: dict[str, Any], context: ik.RunContext
) -> dict[str, Any] | None:
    """scaled_mean without a `scale` scales by the number of test batches the run has."""
    if name != "scaled_mean" or "scale" in options or context.test_loader is None:
        return None
    return {"scale": float(len(list(context.test_loader)))}


@ik.hookimpl
def ikkuna_configure(config: ik.IkkunaConfig) -> None:
    CALLS.append(f"configure:{config.log_dir.name}")


@ik.hookimpl
def ikkuna_run_started(exporter: ik.Exporter) -> None:
    CALLS.append("run_started")


@ik.hookimpl
def ikkuna_run_finished(exporter: ik.Exporter) -> None:
    CALLS.append("run_finished")
