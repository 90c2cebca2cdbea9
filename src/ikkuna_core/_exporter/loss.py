"""Where the step's loss is seen: a watched loss function (wrapped, or an ``nn.Module``
hooked in place), a model that computes its own loss, or an integration announcing it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .capture import Capture, output_field
from .clock import StepClock

__all__ = ["LossWatch"]


class LossWatch:
    """The first loss call of a step's first forward goes to ``capture`` (the clock says
    which call that is)."""

    def __init__(self, clock: StepClock, capture: Capture) -> None:
        self._clock = clock
        self._capture = capture
        self.watched = False  # a loss function is watched

    def wrap(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A plain loss function, wrapped: call the returned one."""
        self.watched = True

        @functools.wraps(loss_fn)
        def watched_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = loss_fn(*args, **kwargs)
            if self._clock.loss():
                self._capture.loss(args, kwargs, loss)
            return loss

        return watched_loss

    def on_loss_module(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], loss: Any
    ) -> None:
        """The forward hook of an ``nn.Module`` loss."""
        if self._clock.loss():
            self._capture.loss(args, kwargs, loss)

    def on_forward_end(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: Any, output: Any
    ) -> None:
        """The model's forward hook, for models that compute their own loss
        (``model(**batch).loss``, Hugging Face): the output's ``loss`` and ``logits`` and the
        ``labels`` keyword are the loss topics."""
        if not self._clock.loss_pending or self.watched:
            return
        loss = output_field(output, "loss")
        if isinstance(loss, torch.Tensor) and self._clock.loss():
            logits = output_field(output, "logits")
            self._capture.loss((logits, kwargs.get("labels")), {}, loss)

    def announce(self, loss: torch.Tensor) -> None:
        """The step's loss, announced by an integration; a watched loss that already
        reported wins."""
        if self._clock.loss():
            self._capture.loss((), {}, loss)
