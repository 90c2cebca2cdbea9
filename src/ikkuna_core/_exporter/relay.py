"""The model's own hooks when the watched model is compiled afterwards.

``torch.compile(watched)`` wraps the model in an ``OptimizedModule``. For most models dynamo
calls the model's hooks outside its graph; for a ``torch.nn`` container as the root
(``nn.Sequential``...) it traces the model's whole call, hooks included, and the step
bookkeeping of the model's pre-hook (opening the step, asking what to capture) must stay
out of the graph (``torch.compiler.disable``: one graph break at the forward's entry), or
dynamo would specialise the graph on the step's counters and recompile it every step.

A :class:`Relay` removes that break: the first time the model's hook runs inside a compiled
wrapper's call, it finds the wrapper on the stack and gives it hooks of its own, which run
eagerly before and after the compiled call and do the bookkeeping there; the model's hook
then returns at once while the wrapper's call runs (a flag dynamo guards on: compiled once
more, then never again). The model called directly, uncompiled, keeps its own hooks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Relay"]

#: Frames searched for the compiled wrapper, and calls searched before giving up.
_DEPTH, _TRIES = 40, 3


class Relay:
    """The model's forward pre-hook and forward hook, relayed to a compiled wrapper's."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inside = False  # a wrapper's call of the model is running: it did the hooks' work
        self._pre: Callable[..., Any] | None = None
        self._post: Callable[..., Any] | None = None
        self._wrappers: dict[int, list[RemovableHandle]] = {}
        self._tries = _TRIES
        self._compiled_model = _is_compiled(model)

    @property
    def compiled(self) -> bool:
        """Whether the model is (or is inside) a ``torch.compile`` wrapper, or holds one."""
        return self._compiled_model or bool(self._wrappers)

    def pre_hook(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook(module, args, kwargs)`` as the model's forward pre-hook (with_kwargs)."""
        self._pre = hook
        eager = self._eager(hook)
        disabled = torch.compiler.disable(eager)

        def on_model(module: nn.Module, args: Any, kwargs: Any) -> Any:
            if self.inside:
                return None
            if torch.compiler.is_compiling():  # traced: keep the bookkeeping out of graphs
                return disabled(module, args, kwargs)
            return eager(module, args, kwargs)  # eager: no disabling wrapper to go through

        return on_model

    def post_hook(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook(module, args, kwargs, output)`` as the model's forward hook (with_kwargs)."""
        self._post = hook
        disabled = torch.compiler.disable(hook)

        def on_model(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if self.inside:
                return None
            if torch.compiler.is_compiling():
                return disabled(module, args, kwargs, output)
            return hook(module, args, kwargs, output)

        return on_model

    def post_removed(self) -> None:
        """The model's forward hook was removed (its topics are no longer wanted)."""
        self._post = None

    def remove(self) -> None:
        """Remove the hooks given to compiled wrappers."""
        for handles in self._wrappers.values():
            for h in handles:
                h.remove()
        self._wrappers.clear()

    # ------------------------------------------------------------------ internals
    def _eager(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def run(module: nn.Module, args: Any, kwargs: Any) -> Any:
            if self._tries and _in_compiled_wrapper():
                self._adopt()
            return hook(module, args, kwargs)

        return run

    def _adopt(self) -> None:
        """Give the compiled wrapper of the model now on the stack hooks of its own."""
        wrapper = _wrapper_on_stack(self.model)
        if wrapper is None:
            self._tries -= 1
            return
        if id(wrapper) in self._wrappers:
            return
        self._wrappers[id(wrapper)] = [
            wrapper.register_forward_pre_hook(self._wrapper_pre, with_kwargs=True),
            wrapper.register_forward_hook(self._wrapper_post, with_kwargs=True,
                                          always_call=True),
        ]

    def _wrapper_pre(self, wrapper: nn.Module, args: Any, kwargs: Any) -> None:
        if self._pre is not None:
            self._pre(self.model, args, kwargs)
        self.inside = True

    def _wrapper_post(self, wrapper: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self.inside = False
        if self._post is not None:
            self._post(self.model, args, kwargs, output)


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper or holds one (a compiled block)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(frame, "OptimizedModule", None)
    return wrapper is not None and any(isinstance(m, wrapper) for m in model.modules())


def _in_compiled_wrapper() -> bool:
    """Whether a ``torch.compile`` wrapper's call is running (dynamo's own flag; no import)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    return bool(getattr(frame, "_in_optimized_module", False))


def _wrapper_on_stack(model: nn.Module) -> nn.Module | None:
    """The ``OptimizedModule`` whose call of ``model`` is on the stack, if any."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame: Any = sys._getframe(1)
    for _ in range(_DEPTH):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule) and owner._orig_mod is model:
            return owner
        frame = frame.f_back
    return None
