"""The results sink: what subscribers publish during their step, turned into one message per
subscriber and topic, and into the payloads of derived topics for later subscribers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..messages import HistogramsMessage, ModuleInfo, ScalarsMessage, TopicPayloads
from ..ops import Histograms

__all__ = ["Results", "payloads_of", "tags", "values_message"]

#: (global_step, epoch, batch_index) of a step.
Stamp = tuple[int, int, int]


@dataclass
class _Collected:
    """Results one subscriber published for one topic during its step."""

    keys: list[str | None] = field(default_factory=list)
    scalars: list[torch.Tensor] = field(default_factory=list)
    hists: list[Histograms] = field(default_factory=list)
    stamp: Stamp | None = None  # an earlier step's, for a value known one step late


class Results:
    """Where subscribers publish (``Subscriber.publish_*`` call :meth:`add_scalars` and
    :meth:`add_histograms`); open only while the bus runs one subscriber's step."""

    def __init__(self) -> None:
        self._open: tuple[object, dict[str, _Collected]] | None = None

    def open(self, owner: object) -> None:
        """Subscriber ``owner``'s step begins."""
        self._open = (owner, {})

    def close(self, stamp: Stamp) -> list[ScalarsMessage | HistogramsMessage]:
        """The step ends: its results, one message per topic (nothing after a failure:
        call with the subscriber's failure already known and discard)."""
        current, self._open = self._open, None
        if current is None:
            return []
        return [_message(topic, got, stamp) for topic, got in current[1].items()]

    def hold(self) -> object:
        """Set the open subscriber's results aside (it waits for a merge of shards);
        :meth:`resume` reopens them."""
        current, self._open = self._open, None
        return current

    def resume(self, held: object) -> None:
        """Reopen results set aside by :meth:`hold`."""
        self._open = held  # type: ignore[assignment]

    def _collector(self, owner: object, topic: str) -> _Collected:
        current = self._open
        if current is None or current[0] is not owner:
            raise RuntimeError(
                f"subscriber {_name(owner)!r} published outside its compute/compute_step; "
                "front ends write their own values with bus.log_scalars"
            )
        got = current[1].get(topic)
        if got is None:
            got = current[1][topic] = _Collected()
        return got

    def add_scalars(
        self, owner: object, topic: str, keys: Sequence[str | None], values: torch.Tensor,
        stamp: Stamp | None = None,
    ) -> None:
        """Subscriber ``owner`` reports ``values[i]`` for ``keys[i]`` under ``topic``
        (``stamp``: an earlier step's, which all of the topic's values of the step share)."""
        got = self._collector(owner, topic)
        if got.hists:
            raise ValueError(f"topic {topic!r} mixes scalars and histograms")
        if got.scalars and got.stamp != stamp:
            raise ValueError(f"topic {topic!r}: values of two steps in one step's results")
        got.stamp = stamp
        got.keys.extend(keys)
        got.scalars.append(values)

    def add_histograms(
        self, owner: object, topic: str, keys: Sequence[str | None], hists: Histograms
    ) -> None:
        """Subscriber ``owner`` reports histogram row ``i`` for ``keys[i]`` under ``topic``."""
        got = self._collector(owner, topic)
        if got.scalars:
            raise ValueError(f"topic {topic!r} mixes scalars and histograms")
        if got.hists and got.hists[0].counts.shape[1] != hists.counts.shape[1]:
            raise ValueError(
                f"subscriber {_name(owner)!r}: histograms of topic {topic!r} with "
                f"{got.hists[0].counts.shape[1]} and {hists.counts.shape[1]} bins in one step"
            )
        got.keys.extend(keys)
        got.hists.append(hists)


def _message(topic: str, got: _Collected, stamp: Stamp) -> ScalarsMessage | HistogramsMessage:
    step, epoch, batch = got.stamp or stamp
    if got.scalars:
        values = got.scalars
        if len(values) > 1:
            device = values[0].device
            values = [v if v.device == device else v.to(device) for v in values]
        data = values[0] if len(values) == 1 else torch.cat(values)
        return ScalarsMessage(topic=topic, global_step=step, epoch=epoch, batch_index=batch,
                              keys=got.keys, tags=tags(topic, got.keys), data=data)
    hists = got.hists[0]
    if len(got.hists) > 1:
        hists = type(hists)(*(torch.cat(parts) for parts in zip(*got.hists, strict=True)))
    return HistogramsMessage(topic=topic, global_step=step, epoch=epoch, batch_index=batch,
                             keys=got.keys, tags=tags(topic, got.keys), **hists._asdict())


def _name(owner: object) -> str:
    return str(getattr(owner, "name", owner))


def tags(topic: str, keys: Sequence[str | None]) -> list[str]:
    """Backend tags: ``<topic>/<key>``, ``<topic>`` for the key None (a network value)."""
    return [topic if k is None else f"{topic}/{k}" for k in keys]


def payloads_of(
    message: ScalarsMessage | HistogramsMessage, modules: dict[str | None, ModuleInfo | None]
) -> TopicPayloads:
    """A result as the payloads of a derived topic, for the subscribers that consume it."""
    values = message.data if isinstance(message, ScalarsMessage) else message.counts
    return TopicPayloads(
        topic=message.topic,
        keys=message.keys,
        modules=[modules.get(k) for k in message.keys],
        data=list(values.unbind(0)),
    )


def values_message(
    stamp: Stamp, topic: str, values: Mapping[Any, float | torch.Tensor]
) -> ScalarsMessage:
    """A message of scalars no subscriber computed (a front end's epoch summaries); the tag
    is ``<topic>/<key>`` (``<topic>`` for the key None)."""
    step, epoch, batch = stamp
    keys = list(values)
    data = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    return ScalarsMessage(topic=topic, global_step=step, epoch=epoch, batch_index=batch,
                          keys=keys, tags=tags(topic, keys), data=data)
