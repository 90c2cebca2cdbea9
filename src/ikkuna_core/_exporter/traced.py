"""The watched modules' forward hooks as torch.compile traces them: the same graph for every
module, so that identical blocks compiled one by one (``block.compile()``, as torchtitan
does) share one graph watched as they do unwatched.

Dynamo guards on every Python constant a traced hook reads: a module's index, its capture
mode, its call count. So the traced part of the hook reads none of them: it hands the
module's output and input to an op with an ordered side effect (``ikkuna::module_forward``),
and names the module by a 0-d tensor, an input of the graph like any other tensor (guarded on
its dtype and shape, not its value). The op runs eagerly where the compiled graph calls it:
there the capture reads the module's index, its plan and its call count, and copies what is
wanted. It returns the call's number as a tensor, which the layer-gradient hook (traced into
the compiled backward, ``ikkuna::layer_gradient``) hands back with the gradient.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["ModuleHook", "TracedCapture", "first_tensor", "register"]


class TracedCapture(Protocol):
    """What the traced hook reads of the capture (its number, and which of the forward
    topics ``activations``, ``layer_gradients``, ``inputs`` the running forward captures),
    and what the ops call in it, eagerly."""

    number: int
    traced_wants: tuple[bool, bool, bool]

    def compiled_forward(self, index: int, output: torch.Tensor | None,
                         inputs: torch.Tensor | None) -> int: ...

    def compiled_layer_gradient(self, index: int, call: int, grad: torch.Tensor) -> None: ...


#: The live captures by their number: a compiled graph names its capture by a number (a
#: constant of the graph, the same for every module), and the ops find it here.
_CAPTURES: dict[int, weakref.ref[TracedCapture]] = {}
_NUMBERS = itertools.count()


def register(capture: TracedCapture) -> int:
    """The number the ops know ``capture`` by (for as long as it lives); the ops defined."""
    _define_ops()
    number = next(_NUMBERS)
    _CAPTURES[number] = weakref.ref(capture)
    weakref.finalize(capture, _CAPTURES.pop, number, None)
    return number


def _find(number: int) -> TracedCapture | None:
    ref = _CAPTURES.get(number)
    return None if ref is None else ref()


class ModuleHook:
    """A watched module's forward hook: ``eager(index, module, args, output)`` when the
    module runs eagerly; traced by dynamo, it reads only the token (a 0-d tensor holding the
    index) and what ``capture`` captures, so every module's hook traces to the same graph."""

    __slots__ = ("capture", "eager", "index", "token")

    def __init__(self, index: int, eager: Callable[..., None], capture: TracedCapture) -> None:
        self.index, self.eager, self.capture = index, eager, capture
        self.token = torch.tensor(index)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            _traced_forward(self.capture, self.token, args, output)
        else:
            self.eager(self.index, module, args, output)


def _traced_forward(capture: TracedCapture, token: torch.Tensor, args: Any, output: Any) -> None:
    """The hook as dynamo traces it: the module's output and input to the op, which does the
    bookkeeping eagerly and copies what is wanted."""
    act, lgrad, inp = capture.traced_wants
    if not (act or lgrad or inp):
        return
    out = output if isinstance(output, torch.Tensor) else first_tensor(output)
    x = first_tensor(args) if inp else None
    if out is None and x is None:
        return
    call = torch.ops.ikkuna.module_forward(token, capture.number, out, x)
    if lgrad and out is not None and out.requires_grad:
        # a hook that calls an op of its own: traced into the compiled backward (a Python
        # side effect in a hook on an intermediate breaks the graph)
        out.register_hook(functools.partial(_layer_gradient, capture.number, token, call))


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of a tensor, a tuple/list or a dict (depth first)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _layer_gradient(number: int, token: torch.Tensor, call: torch.Tensor,
                    grad: torch.Tensor) -> None:
    """The layer-gradient hook of a compiled forward: the op, which the compiled backward
    calls where eager autograd would call the hook."""
    torch.ops.ikkuna.layer_gradient(grad, number, token, call)


_OPS_DEFINED = False


def _define_ops() -> None:
    """Define, once, ``ikkuna::module_forward(token, capture, output, input) -> call`` and
    ``ikkuna::layer_gradient(grad, capture, token, call) -> ()``: ops with an ordered side
    effect (so no compiler drops or reorders them) that hand their tensors to the capture."""
    global _OPS_DEFINED
    if _OPS_DEFINED:
        return
    from torch._library.effects import EffectType

    @torch.library.custom_op("ikkuna::module_forward", mutates_args=())
    def module_forward(token: torch.Tensor, number: int, output: torch.Tensor | None,
                       inputs: torch.Tensor | None) -> torch.Tensor:
        capture = _find(number)
        call = -1 if capture is None else capture.compiled_forward(int(token), output, inputs)
        return torch.tensor(call)

    @module_forward.register_fake
    def _(token: torch.Tensor, number: int, output: torch.Tensor | None,
          inputs: torch.Tensor | None) -> torch.Tensor:
        return torch.empty((), dtype=torch.int64)

    @torch.library.custom_op("ikkuna::layer_gradient", mutates_args=())
    def layer_gradient(grad: torch.Tensor, number: int, token: torch.Tensor,
                       call: torch.Tensor) -> None:
        capture = _find(number)
        index, at = int(token), int(call)
        if capture is not None and at >= 0:
            capture.compiled_layer_gradient(index, at, grad)

    @layer_gradient.register_fake
    def _(grad: torch.Tensor, number: int, token: torch.Tensor, call: torch.Tensor) -> None:
        return None

    module_forward.register_effect(EffectType.ORDERED)
    layer_gradient.register_effect(EffectType.ORDERED)
    _OPS_DEFINED = True
