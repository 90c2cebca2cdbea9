"""Setups that would publish nothing, said once as a ``RuntimeWarning`` naming the fix."""

from __future__ import annotations

from collections.abc import Callable

from ..topics import FORWARD_TOPICS
from .clock import Ended
from .hooks import LOSS_TOPICS

__all__ = ["Diagnostics"]


class Diagnostics:
    """Looks at each ended step; ``warn_once(ident, message)`` is the bus's registry."""

    def __init__(self, warn_once: Callable[[str, str], None]) -> None:
        self._warn_once = warn_once
        self._steps_without_forward = 0
        self._steps_without_loss = 0

    def step_ended(
        self, ended: Ended, wanted: frozenset[str], *, model: str, training_forwards: int,
        loss_watched: bool,
    ) -> None:
        if not ended.forwards and ended.stepped and wanted & (FORWARD_TOPICS | LOSS_TOPICS):
            self._missing_forward(model, training_forwards)
        if ended.loss_missing and ended.forwards and wanted & LOSS_TOPICS:
            self._missing_loss(wanted & LOSS_TOPICS, loss_watched)

    def _missing_forward(self, model: str, training_forwards: int) -> None:
        """Optimizer steps of the model's parameters without a forward of the watched model:
        forward topics can never be published. Said once, after three such steps."""
        self._steps_without_forward += 1
        if self._steps_without_forward == 3 and not training_forwards:
            self._warn_once(
                "no-forward",
                f"the optimizer stepped 3 times but the watched {model} never ran a training "
                "forward, so activations, the loss and the outputs are not published. Watch "
                "the module your training code calls (e.g. the network a LightningModule's "
                "training_step calls), or use the Lightning callback",
            )

    def _missing_loss(self, topics: frozenset[str], loss_watched: bool) -> None:
        """Steps whose forward ran but whose loss was never seen: the loss topics cannot be
        published. Said once, at the second such step (a close() right after a forward
        does not count as a mistake)."""
        self._steps_without_loss += 1
        if self._steps_without_loss != 2:
            return
        missing = sorted(topics)
        if not loss_watched:
            self._warn_once(
                "no-loss",
                f"{missing} are subscribed but no loss function is set and the model's output "
                "carries no loss, so they are never published. Watch the loss: "
                "ik.watch(model, loss_fn, ...) or Exporter(model, loss_fn) (formerly "
                "exporter.set_loss(loss_fn)), and compute the loss with exporter.loss_fn; or "
                "let the model compute it, as Hugging Face models do: an output with 'loss' "
                "and 'logits' fields, the labels passed as the labels= keyword",
            )
        else:
            self._warn_once(
                "loss-not-called",
                f"{missing} are subscribed but the loss function given to the Exporter was not "
                "called in the step, so they are never published. Compute the loss with the "
                "callable the Exporter returned (exporter.loss_fn): a plain function is "
                "wrapped, not changed in place",
            )
