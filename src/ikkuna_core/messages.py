"""The typed message contract between the Exporter, the MessageBus and plugins.

Every message is a frozen pydantic model; payloads are ``torch.Tensor``s: the training
step's own tensors, not copies. ``weights``/``biases`` are the parameters themselves,
``*_gradients`` are ``p.grad``, ``activations``, ``inputs`` and the loss topics are the
tensors the forward made (attached to autograd's graph), ``*_updates`` are buffers the
Exporter reuses every step; only samples (``Subscriber.sample_size``) and the copies of
tensors seen changing in place are fresh. Subscribers run under ``torch.no_grad()``: never
change a payload in place (that changes training), and ``clone()`` one to keep it past the
call that received it.

Sharded parameters (DTensors: FSDP2, tensor parallelism) reach a subscriber as full tensors
gathered for it, or, when it declares ``sharded = "merge"``, as this rank's local shard
(``Subscriber.merge_shards`` merges its statistics across the ranks).

Two shapes of the same data:

- :class:`StepBundle` — what a step-level subscriber receives once per step: for each of its
  topics a :class:`TopicPayloads` holding every module's key, module and tensor.
- :class:`MessageBundle` — what a per-module subscriber receives: one module's (or the
  network's) payloads of one step, one :class:`ModuleMessage`/:class:`NetworkMessage` per topic.

Results travel as one :class:`ScalarsMessage` or :class:`HistogramsMessage` per subscriber,
topic and step (values of all modules stacked), to the backends and to other subscribers.

The JSON Schema of every message type is available from :func:`message_json_schema`, the
documented contract for plugin authors (``ikkuna schema`` prints it). Messages are built at
the end of a step, never inside a module hook.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema, model_validator

from .topics import EVENT_TOPICS, MODULE_TOPICS, NETWORK_TOPICS, TopicSpec

__all__ = [
    "EVENT_TOPICS",
    "MODULE_TOPICS",
    "NETWORK_TOPICS",
    "HistogramsMessage",
    "Message",
    "MessageBundle",
    "ModuleInfo",
    "ModuleMessage",
    "NetworkMessage",
    "ScalarsMessage",
    "StepBundle",
    "Tensor",
    "TopicPayloads",
    "TopicSpec",
    "message_json_schema",
]

#: A tensor payload. Validation is a plain ``isinstance`` check; the JSON Schema describes it.
Tensor = Annotated[
    torch.Tensor,
    WithJsonSchema(
        {
            "type": "array",
            "description": "a torch.Tensor (in Python); nested lists of numbers when serialised",
        }
    ),
]

_FROZEN = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")


class ModuleInfo(BaseModel):
    """Identity of a watched module: its dotted name in the model and its class name."""

    model_config = _FROZEN

    name: str = Field(description="dotted name from named_modules(), e.g. 'layer1.0.conv1'")
    type: str = Field(description="class name, e.g. 'Conv2d'")


class _Stamped(BaseModel):
    model_config = _FROZEN

    topic: str
    global_step: int = Field(ge=0, description="optimizer steps since the exporter was attached")
    epoch: int = Field(ge=0)
    batch_index: int = Field(ge=0, description="index of the step within its epoch")


def key_of(module: str, parameter: str | None) -> str:
    """The name a payload is reported under: the module, or ``module.parameter`` for
    parameters other than ``weight``/``bias`` (LSTM's ``weight_hh_l0``, a ViT's
    ``cls_token``)."""
    if parameter is None or parameter in ("weight", "bias"):
        return module
    return parameter if module == "model" else f"{module}.{parameter}"


class ModuleMessage(_Stamped):
    """Data of one module at one step, e.g. its activations or its weight gradients."""

    kind: Literal["module"] = "module"
    module: ModuleInfo
    parameter: str | None = Field(
        default=None,
        description="parameter name for parameter topics ('weight', 'bias', 'weight_ih_l0')",
    )
    key: str = Field(
        default="",
        description="what the data is reported under: the module name, 'module.parameter' "
        "for other parameters, 'name#1' for a module's second call in one forward",
    )
    data: Tensor

    @model_validator(mode="after")
    def _default_key(self) -> ModuleMessage:
        if not self.key:
            object.__setattr__(self, "key", key_of(self.module.name, self.parameter))
        return self


class NetworkMessage(_Stamped):
    """Data about the whole network at one step (loss, labels, output, step/epoch events)."""

    kind: Literal["network"] = "network"
    data: Tensor | None = None

    @property
    def key(self) -> None:
        return None


class ScalarsMessage(_Stamped):
    """The scalars one subscriber computed for one topic at one step: one value per key, all
    in one tensor that stays on its device until the backends flush."""

    kind: Literal["scalars"] = "scalars"
    keys: list[str | None] = Field(description="module keys; None: the network")
    tags: list[str] = Field(description="backend tags: '<topic>/<key>', or '<topic>'")
    data: Tensor = Field(description="the values, shape (len(keys),)")


class HistogramsMessage(_Stamped):
    """The histograms one subscriber computed for one topic at one step, stacked: row i
    belongs to ``keys[i]``. Bins are computed on the tensors' device; only they leave it."""

    kind: Literal["histograms"] = "histograms"
    keys: list[str | None]
    tags: list[str]
    counts: Tensor = Field(description="bin counts, shape (n, bins)")
    edges: Tensor = Field(description="bin edges, shape (n, bins + 1)")
    min: Tensor = Field(description="smallest finite value, shape (n,)")
    max: Tensor
    num: Tensor = Field(description="number of finite values binned")
    sum: Tensor
    sum_squares: Tensor
    nonfinite: Tensor = Field(description="number of NaN/inf values (not in the bins)")


Message = Annotated[
    ModuleMessage | NetworkMessage | ScalarsMessage | HistogramsMessage,
    Field(discriminator="kind"),
]


class MessageBundle(BaseModel):
    """What a per-module subscriber receives: one payload per subscribed topic for one module
    (or the network) at one step. ``bundle[topic]`` is the payload; ``bundle.messages[topic]``
    the whole message."""

    model_config = _FROZEN

    kind: Literal["bundle"] = "bundle"
    key: str | None = Field(description="module (or module.parameter) name; None: network")
    module: ModuleInfo | None = None
    global_step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    batch_index: int = Field(ge=0)
    messages: dict[str, ModuleMessage | NetworkMessage]

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self.messages)

    def __getitem__(self, topic: str) -> torch.Tensor | None:
        try:
            return self.messages[topic].data
        except KeyError:
            raise KeyError(
                f"topic {topic!r} is not in this bundle; it holds {sorted(self.messages)}"
            ) from None

    def tensor(self, topic: str) -> torch.Tensor:
        """``bundle[topic]`` detached, for topics that must carry a tensor."""
        data = self[topic]
        if data is None:
            raise ValueError(f"topic {topic!r} carries no tensor payload")
        return data.detach()


class TopicPayloads(BaseModel):
    """Every payload of one topic at one step: ``data[i]`` belongs to ``keys[i]`` (module
    ``modules[i]``; None for network topics). A payload of a forward topic is a 1-d sample of
    the module's tensor when every subscriber that wants that module asked for samples
    (``Subscriber.sample_size``), a 0-d finiteness check when every one asked for that
    (``Subscriber.finiteness_only``); whole tensors otherwise."""

    model_config = _FROZEN

    kind: Literal["payloads"] = "payloads"
    topic: str
    keys: list[str | None]
    modules: list[ModuleInfo | None]
    data: list[Tensor | None]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def event(cls, topic: str) -> TopicPayloads:
        """The payloads of an event topic (``batch_finished``…): one entry, no tensor."""
        return cls(topic=topic, keys=[None], modules=[None], data=[None])

    def tensors(self) -> list[torch.Tensor]:
        """The payloads, for topics whose payloads are all tensors."""
        out = [t for t in self.data if t is not None]
        if len(out) != len(self.data):
            raise ValueError(f"topic {self.topic!r} carries no tensor payload")
        return out

    def select(self, indices: list[int]) -> TopicPayloads:
        """These payloads restricted to ``indices`` (in that order)."""
        return TopicPayloads(
            topic=self.topic,
            keys=[self.keys[i] for i in indices],
            modules=[self.modules[i] for i in indices],
            data=[self.data[i] for i in indices],
        )


class StepBundle(BaseModel):
    """What a step-level subscriber receives once per step: ``step[topic]`` holds every
    module's payload of that topic. For a synchronized subscriber every topic holds the same
    keys in the same order (those present in all its topics)."""

    model_config = _FROZEN

    kind: Literal["step"] = "step"
    global_step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    batch_index: int = Field(ge=0)
    payloads: dict[str, TopicPayloads]
    #: The payloads of an attempt whose optimizer step was skipped (GradScaler's overflow,
    #: ``if not torch.isfinite(loss): continue``): handed only to subscribers that set
    #: ``sees_skipped_steps``, under the number of the step that follows it.
    skipped: bool = False

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self.payloads)

    def __getitem__(self, topic: str) -> TopicPayloads:
        try:
            return self.payloads[topic]
        except KeyError:
            raise KeyError(
                f"topic {topic!r} is not in this step; it holds {sorted(self.payloads)}"
            ) from None

    def bundles(self, synchronized: bool = False) -> Iterator[MessageBundle]:
        """The per-module view: one bundle per key and topic, or (``synchronized``) one per
        key holding all topics."""
        step, epoch, batch = self.global_step, self.epoch, self.batch_index
        if synchronized:
            first = next(iter(self.payloads.values()), None)
            if first is None:
                return
            for i, key in enumerate(first.keys):
                messages = {t: _message(p, i, step, epoch, batch) for t, p in self.payloads.items()}
                yield MessageBundle(key=key, module=first.modules[i], messages=messages,
                                    global_step=step, epoch=epoch, batch_index=batch)
            return
        for topic, payloads in self.payloads.items():
            for i, key in enumerate(payloads.keys):
                yield MessageBundle(
                    key=key,
                    module=payloads.modules[i],
                    messages={topic: _message(payloads, i, step, epoch, batch)},
                    global_step=step, epoch=epoch, batch_index=batch,
                )


def _message(
    p: TopicPayloads, i: int, step: int, epoch: int, batch: int
) -> ModuleMessage | NetworkMessage:
    module = p.modules[i]
    data = p.data[i]
    if module is None:
        return NetworkMessage(topic=p.topic, data=data, global_step=step, epoch=epoch,
                              batch_index=batch)
    assert data is not None
    return ModuleMessage(topic=p.topic, module=module, key=p.keys[i] or "", data=data,
                         global_step=step, epoch=epoch, batch_index=batch)


_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


def message_json_schema() -> dict[str, Any]:
    """JSON Schema of the message contract: every message type and both bundle shapes."""
    return {
        "title": "Ikkuna message contract",
        "message": _MESSAGE_ADAPTER.json_schema(),
        "bundle": MessageBundle.model_json_schema(),
        "step": StepBundle.model_json_schema(),
        "topic": TopicSpec.model_json_schema(),
    }
