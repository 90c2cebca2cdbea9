"""The model's own hooks when the watched model is compiled afterwards.

``torch.compile(watched)`` wraps the model in an ``OptimizedModule``. For most models dynamo
calls the model's hooks outside its graph; for a ``torch.nn`` container as the root
(``nn.Sequential``...) it traces the model's whole call, hooks included, and the step
bookkeeping of the model's pre-hook (opening the step, asking what to capture) must stay
out of the graph (``torch.compiler.disable``: one graph break at the forward's entry), or
dynamo would specialise the graph on the step's counters and recompile it every step.

A :class:`Relay` removes that break: when dynamo starts compiling inside a compiled
wrapper's call of the model (its compile-start callback, which runs eagerly, before any
tracing), the relay finds the wrapper on the stack, does that call's bookkeeping there and
gives the wrapper hooks of its own, which run eagerly before and after every later compiled
call; the model's hook returns at once while a wrapper's call runs (a flag dynamo guards
on), so it traces to nothing. Should the callback not catch it, the model's hook adopts the
wrapper the same way at the first break. The model called directly keeps its own hooks.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
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
        self._callback = _compile_start_callback(self)

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
        """Remove the hooks given to compiled wrappers, and the compile-start callback."""
        if self._callback is not None:
            from torch._dynamo.callback import callback_handler

            if self._callback in callback_handler.start_callbacks:  # torch._dynamo.reset()
                callback_handler.remove_start_callback(self._callback)  # clears them
            self._callback = None
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

    def compile_started(self) -> None:
        """Dynamo starts compiling a frame: inside a wrapper's first call of the model, do
        that call's bookkeeping now (the wrapper's hooks come too late for it) and adopt the
        wrapper; the flag stays set until the next optimizer step begins."""
        if self.inside or self._pre is None or not _in_compiled_wrapper():
            return
        found = _wrapper_on_stack(self.model, frames=True)
        if found is None or id(found[0]) in self._wrappers:
            return
        wrapper, frame = found
        self._adopt(wrapper)
        self._pre(self.model, frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {}))
        self.inside = True
        handle: list[RemovableHandle] = []

        def stepping(*_: Any) -> None:  # once: this call's wrapper hooks did not run
            self.inside = False
            handle.pop().remove()

        handle.append(register_optimizer_step_pre_hook(stepping))

    def _adopt(self, wrapper: nn.Module | None = None) -> None:
        """Give the compiled wrapper of the model now on the stack hooks of its own."""
        if wrapper is None:  # (not `or`: a wrapper's truth is its model's length)
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


def _wrapper_on_stack(model: nn.Module, frames: bool = False) -> Any:
    """The ``OptimizedModule`` whose call of ``model`` is on the stack, if any (with
    ``frames``: and the frame of its ``__call__``, whose locals hold the call's arguments)."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame: Any = sys._getframe(1)
    for _ in range(_DEPTH * 4 if frames else _DEPTH):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule) and owner._orig_mod is model:
            return (owner, frame) if frames else owner
        frame = frame.f_back
    return None


def _compile_start_callback(relay: Relay) -> Callable[[Any], None] | None:
    """Dynamo's compile-start callback for ``relay`` (held weakly: a model that is no longer
    watched is not kept alive by it); None where torch has no such callbacks."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # pragma: no cover - older torch
        return None
    ref = weakref.ref(relay)

    def started(args: Any = None) -> None:
        found = ref()
        if found is not None:
            found.compile_started()

    return callback_handler.register_start_callback(started)
