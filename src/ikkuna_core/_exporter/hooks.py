"""Every torch hook an Exporter installs, kept in one place: exactly those the subscribed
topics need, each with its removable handle, and the one guard that keeps an error inside a
hook from stopping training."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch._C import _current_graph_task_id
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from ..errors import IkkunaError
from ..topics import FORWARD_TOPICS, GRADIENT_TOPICS
from .relay import Relay
from .traced import ModuleHook, TracedCapture

__all__ = ["LOSS_TOPICS", "Callbacks", "Hooks", "guard", "in_backward"]

LOSS_TOPICS = frozenset({"network_output", "input_labels", "loss"})


class guard:
    """Nothing inside a hook may stop training: an error is ``report``-ed (the bus's error
    policy decides) after ``cleanup``; a subscriber's or backend's error under
    ``on_error="raise"`` (an :class:`IkkunaError`) goes through as it is. A class, not a
    generator: it runs in every hook of every step."""

    __slots__ = ("cleanup", "report", "where")

    def __init__(
        self, report: Callable[[str, BaseException], None], where: str,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.report, self.where, self.cleanup = report, where, cleanup

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        if exc is None or isinstance(exc, IkkunaError) or not isinstance(exc, Exception):
            return False
        if self.cleanup is not None:
            self.cleanup()
        self.report(self.where, exc)  # never stop training
        return True


def in_backward() -> bool:
    """Whether autograd is executing a backward now: a forward that runs then is activation
    checkpointing's recomputation (``torch.utils.checkpoint``, reentrant or not), no call."""
    return bool(_current_graph_task_id() != -1)


class Callbacks:
    """What the hooks call (the Exporter's handlers; ``module_traced``: the capture a
    module's hook hands its tensors to under torch.compile)."""

    __slots__ = ("forward_end", "forward_start", "grad_accumulated", "module_forward",
                 "module_traced", "optimizer_post", "optimizer_pre")

    def __init__(
        self, *, forward_start: Callable[..., None], forward_end: Callable[..., None],
        module_forward: Callable[..., None], module_traced: TracedCapture,
        grad_accumulated: Callable[[int, Any], None],
        optimizer_pre: Callable[..., None], optimizer_post: Callable[..., None],
    ) -> None:
        self.forward_start, self.forward_end = forward_start, forward_end
        self.module_forward, self.module_traced = module_forward, module_traced
        self.grad_accumulated = grad_accumulated
        self.optimizer_pre, self.optimizer_post = optimizer_pre, optimizer_post


class Hooks:
    """The hooks on one model: the model's forward pre-hook and torch's global optimizer
    hooks (always), a forward hook per watched module (forward topics), the model's forward
    hook (loss topics, for models that compute their own loss), a gradient-accumulated hook
    per parameter (gradient topics, until an optimizer steps), and loss modules' hooks.
    A module's forward hook traces under torch.compile to the same graph for every module
    (:class:`~.traced.ModuleHook`): identical blocks compiled one by one share one graph."""

    def __init__(
        self, model: nn.Module, modules: Sequence[nn.Module],
        params: Sequence[tuple[str, torch.Tensor]], callbacks: Callbacks,
    ) -> None:
        self._model = model
        self._modules = list(modules)
        self._params = list(params)  # (kind, tensor) by parameter index
        self._on = callbacks
        self._module_hooks = [ModuleHook(i, callbacks.module_forward, callbacks.module_traced)
                              for i in range(len(self._modules))]
        self._handles: dict[str, list[RemovableHandle]] = {
            "always": [], "forward": [], "output": []
        }
        self._grad_handles: dict[int, RemovableHandle] = {}
        self._relay = Relay(model)  # the model's own hooks, outside compiled graphs
        self._step_topics: frozenset[str] | None = None  # what sync_step last installed for
        self._handles["always"] += [
            model.register_forward_pre_hook(
                self._relay.pre_hook(callbacks.forward_start), with_kwargs=True
            ),
            register_optimizer_step_pre_hook(callbacks.optimizer_pre),
            register_optimizer_step_post_hook(callbacks.optimizer_post),
        ]

    @property
    def count(self) -> int:
        """Number of hooks currently installed."""
        return sum(map(len, self._handles.values())) + len(self._grad_handles)

    def watch_loss(self, loss_fn: nn.Module, on_loss: Callable[..., None]) -> None:
        """Hook an ``nn.Module`` loss in place."""
        self._handles["always"].append(loss_fn.register_forward_hook(on_loss, with_kwargs=True))

    def sync(self, topics: frozenset[str], grads_from_optimizer: bool) -> None:
        """Install exactly the hooks ``topics`` need; remove the others."""
        self._step_topics = None
        self._toggle("forward", bool(topics & FORWARD_TOPICS), self._forward_hooks)
        self._toggle("output", bool(topics & LOSS_TOPICS), lambda: [
            self._model.register_forward_hook(
                self._relay.post_hook(self._on.forward_end), with_kwargs=True
            )
        ])
        if not self._handles["output"]:
            self._relay.post_removed()
        # Until an optimizer shows up, gradients are taken when they are accumulated (loops
        # without an optimizer); the optimizer's pre-step hook then takes over.
        kinds = set() if grads_from_optimizer else {
            kind for kind, topic in GRADIENT_TOPICS.items() if topic in topics
        }
        for i, (kind, tensor) in enumerate(self._params):
            handle = self._grad_handles.get(i)
            if kind in kinds and handle is None and tensor.requires_grad:
                self._grad_handles[i] = tensor.register_post_accumulate_grad_hook(
                    functools.partial(self._on.grad_accumulated, i)
                )
            elif kind not in kinds and handle is not None:
                handle.remove()
                del self._grad_handles[i]

    def sync_step(self, topics: frozenset[str]) -> None:
        """The watched modules' forward hooks only at a step whose ``topics`` need them: at
        the others (a subscriber every 10th step, a budget's cadences) the modules run on
        torch's fast path. Not for a compiled model, whose graphs would be specialised on
        the hooks coming and going."""
        if topics != self._step_topics and not self._relay.compiled:
            self._step_topics = topics
            self._toggle("forward", bool(topics & FORWARD_TOPICS), self._forward_hooks)

    def _forward_hooks(self) -> list[RemovableHandle]:
        return [m.register_forward_hook(hook)
                for m, hook in zip(self._modules, self._module_hooks, strict=True)]

    def _toggle(
        self, group: str, wanted: bool, make: Callable[[], list[RemovableHandle]]
    ) -> None:
        handles = self._handles[group]
        if wanted and not handles:
            handles.extend(make())
        elif not wanted and handles:
            for h in handles:
                h.remove()
            handles.clear()

    def remove(self) -> None:
        """Remove every hook."""
        for handles in self._handles.values():
            for h in handles:
                h.remove()
            handles.clear()
        for h in self._grad_handles.values():
            h.remove()
        self._grad_handles.clear()
        self._relay.remove()
