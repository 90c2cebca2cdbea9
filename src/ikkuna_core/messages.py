"""The typed message contract between the Exporter, the MessageBus and plugins.

Every message is a frozen pydantic model whose payload is a ``torch.Tensor``. Payloads are
*detached views of live training state*: they are valid while the message is being handled;
a subscriber that wants to keep one past its ``compute`` call must ``clone()`` it.

The JSON Schema of every message type is available from :func:`message_json_schema`, the
documented contract for plugin authors (``ikkuna schema`` prints it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema

__all__ = [
    "EVENT_TOPICS",
    "MODULE_TOPICS",
    "NETWORK_TOPICS",
    "HistogramMessage",
    "Message",
    "MessageBundle",
    "ModuleInfo",
    "ModuleMessage",
    "NetworkMessage",
    "ScalarMessage",
    "Tensor",
    "TopicSpec",
    "message_json_schema",
]

#: Per-module topics published by the Exporter (names as in the Ikkuna thesis).
MODULE_TOPICS: tuple[str, ...] = (
    "weights",
    "biases",
    "weight_gradients",
    "bias_gradients",
    "weight_updates",
    "bias_updates",
    "activations",
    "layer_gradients",
)
#: Per-network topics published by the Exporter.
NETWORK_TOPICS: tuple[str, ...] = (
    "batch_started",
    "batch_finished",
    "epoch_started",
    "epoch_finished",
    "input_data",
    "input_labels",
    "network_output",
    "loss",
)
#: Network topics that only mark an event: their payload is None.
EVENT_TOPICS: frozenset[str] = frozenset(
    {"batch_started", "batch_finished", "epoch_started", "epoch_finished"}
)

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


class TopicSpec(BaseModel):
    """A topic the bus knows: its name, what it is attached to, and what it carries."""

    model_config = _FROZEN

    name: str
    kind: Literal["module", "network"]
    doc: str = ""


class ModuleInfo(BaseModel):
    """Identity of a watched module: its dotted name in the model and its class name."""

    model_config = _FROZEN

    name: str = Field(description="dotted name from named_modules(), e.g. 'layer1.0.conv1'")
    type: str = Field(description="class name, e.g. 'Conv2d'")


class _Stamped(BaseModel):
    model_config = _FROZEN

    topic: str
    global_step: int = Field(ge=0, description="training steps since the exporter was attached")
    epoch: int = Field(ge=0)
    batch_index: int = Field(ge=0, description="index of the step within its epoch")


class ModuleMessage(_Stamped):
    """Data of one module at one step, e.g. its activations or its weight gradients."""

    kind: Literal["module"] = "module"
    module: ModuleInfo
    parameter: str | None = Field(
        default=None,
        description="parameter name for parameter topics ('weight', 'bias', 'weight_ih_l0')",
    )
    data: Tensor

    @property
    def key(self) -> str:
        """The name this data is reported under: the module, or module.parameter for
        modules with several weights (LSTM, MultiheadAttention)."""
        if self.parameter is None or self.parameter in ("weight", "bias"):
            return self.module.name
        return f"{self.module.name}.{self.parameter}"


class NetworkMessage(_Stamped):
    """Data about the whole network at one step (loss, labels, output, step/epoch events)."""

    kind: Literal["network"] = "network"
    data: Tensor | None = None

    @property
    def key(self) -> None:
        return None


class ScalarMessage(_Stamped):
    """A scalar metric a subscriber computed; ``data`` is a 0-d tensor, still on its device."""

    kind: Literal["scalar"] = "scalar"
    key: str | None = Field(description="module (or module.parameter) name; None: network")
    tag: str = Field(description="backend tag: '<topic>' or '<topic>/<key>'")
    data: Tensor


class HistogramMessage(_Stamped):
    """A histogram a subscriber computed on the tensor's device; only bins leave it."""

    kind: Literal["histogram"] = "histogram"
    key: str | None
    tag: str
    data: Tensor = Field(description="bin counts (int64), length = number of bins")
    edges: Tensor = Field(description="bin edges, length = number of bins + 1")
    min: Tensor
    max: Tensor
    num: Tensor = Field(description="number of finite values")
    sum: Tensor
    sum_squares: Tensor
    nonfinite: Tensor = Field(description="number of NaN/inf values (not in the bins)")


Message = Annotated[
    ModuleMessage | NetworkMessage | ScalarMessage | HistogramMessage,
    Field(discriminator="kind"),
]


class MessageBundle(BaseModel):
    """What a subscriber receives: one payload per subscribed topic for one module (or the
    network) at one step. ``bundle[topic]`` is the payload; ``bundle.messages[topic]`` the
    whole message."""

    model_config = _FROZEN

    kind: Literal["bundle"] = "bundle"
    key: str | None = Field(description="module (or module.parameter) name; None: network")
    module: ModuleInfo | None = None
    global_step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    batch_index: int = Field(ge=0)
    messages: dict[str, Message]

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


_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


def message_json_schema() -> dict[str, Any]:
    """JSON Schema of the message contract: every message type and the bundle."""
    return {
        "title": "Ikkuna message contract",
        "message": _MESSAGE_ADAPTER.json_schema(),
        "bundle": MessageBundle.model_json_schema(),
        "topic": TopicSpec.model_json_schema(),
    }
