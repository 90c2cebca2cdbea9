"""One example subscriber: options, defaults, a computation that stays on the device."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ikkuna_core import MessageBundle, Subscriber, SubscriberOptions


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
