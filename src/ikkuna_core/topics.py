"""The one topic catalogue: every topic the Exporter publishes, what it carries, when it is
read (the step it belongs to: docs/step-model.md), and how parameters map to topics.
Plugins add topics through the ``ikkuna_topics`` hook; every result a subscriber publishes
becomes a topic of its bus as well."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "EVENT_TOPICS",
    "FORWARD_TOPICS",
    "GRADIENT_TOPICS",
    "MODULE_TOPICS",
    "NETWORK_TOPICS",
    "UPDATE_TOPICS",
    "VALUE_TOPICS",
    "TopicSpec",
    "builtin_topics",
    "parameter_kind",
]


class TopicSpec(BaseModel):
    """A topic a bus knows: its name, what it is attached to, and what it carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["module", "network"]
    doc: str = ""


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
    "inputs",
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
#: Module topics captured in module hooks during forward and backward (all others are read
#: from the parameters at the optimizer step).
FORWARD_TOPICS: frozenset[str] = frozenset({"activations", "layer_gradients", "inputs"})

#: Parameter kind -> topic, for each thing read from a parameter.
VALUE_TOPICS: dict[str, str] = {"weight": "weights", "bias": "biases"}
GRADIENT_TOPICS: dict[str, str] = {"weight": "weight_gradients", "bias": "bias_gradients"}
UPDATE_TOPICS: dict[str, str] = {"weight": "weight_updates", "bias": "bias_updates"}

#: What each built-in topic carries, and when it is read (README: "When is each topic read?";
#: when steps open and end: docs/step-model.md).
_DOCS: dict[str, str] = {
    "weights": "each weight parameter after the step's optimizer update (read at the end "
    "of the optimizer step)",
    "biases": "each bias parameter after the step's optimizer update",
    "weight_gradients": "p.grad of each weight as the optimizer consumes it: read at the "
    "optimizer's pre-step hook, so after gradient accumulation, GradScaler unscaling, "
    "clipping and DDP's all-reduce (with a closure: after the closure ran)",
    "bias_gradients": "p.grad of each bias, read as for weight_gradients",
    "weight_updates": "change of each weight across optimizer.step() (after minus before)",
    "bias_updates": "change of each bias across optimizer.step()",
    "activations": "each module's output in the step's first training forward (first "
    "tensor of a tuple output; a module called again in that forward is 'name#1', ...)",
    "layer_gradients": "gradient of the loss w.r.t. each module's output, in the backward of "
    "the step's first forward",
    "inputs": "each module's input in the step's first training forward (its first tensor "
    "argument), read in the same forward hook as activations",
    "batch_started": "a training step begins (no payload)",
    "batch_finished": "a training step ends (no payload)",
    "epoch_started": "an epoch begins (no payload)",
    "epoch_finished": "an epoch ends (no payload)",
    "input_data": "the first tensor argument (or keyword argument) of the model's forward",
    "input_labels": "the target passed to the loss (or the 'labels' keyword of a model that "
    "computes its own loss)",
    "network_output": "the model output passed to the loss (or a model output's 'logits')",
    "loss": "the loss value of the step's first forward",
}


def builtin_topics() -> list[TopicSpec]:
    """The topics the Exporter publishes."""
    return [TopicSpec(name=t, kind="module", doc=_DOCS[t]) for t in MODULE_TOPICS] + [
        TopicSpec(name=t, kind="network", doc=_DOCS[t]) for t in NETWORK_TOPICS
    ]


def parameter_kind(name: str) -> Literal["weight", "bias"]:
    """Whether a parameter (by its name in its module) is reported as a weight or a bias."""
    return "bias" if "bias" in name.rsplit(".", 1)[-1] else "weight"
