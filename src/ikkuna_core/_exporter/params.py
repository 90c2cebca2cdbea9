"""The watched parameters: discovered once, read at the optimizer step (gradients, a
snapshot that becomes the update), assembled into the step's parameter payloads."""

from __future__ import annotations

import gc
import itertools
import sys
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import nn

from ..messages import ModuleInfo, TopicPayloads, key_of
from ..topics import GRADIENT_TOPICS, UPDATE_TOPICS, VALUE_TOPICS, parameter_kind
from .selection import ROOT_NAME

__all__ = ["Param", "Parameters", "is_dtensor"]

_VALUES = frozenset(VALUE_TOPICS.values())
_GRADIENTS = frozenset(GRADIENT_TOPICS.values())
_UPDATES = frozenset(UPDATE_TOPICS.values())
_TOKENS = itertools.count()  # the clock's names of optimizers

#: A stashed tensor and its version when stashed (-1: a copy, valid whatever happens).
Versioned = tuple[torch.Tensor, int]


class Param:
    """A watched parameter: one tensor (a tied parameter is one), reported once under its
    first owner, with the other names it has in the model."""

    __slots__ = ("aliases", "info", "key", "kind", "name", "tensor")

    def __init__(self, info: ModuleInfo, key: str, name: str, tensor: nn.Parameter) -> None:
        self.info = info
        self.key = key
        self.name = name  # dotted name in the model
        self.kind = parameter_kind(name)
        self.tensor = tensor
        self.aliases: list[str] = []


class Parameters:
    """Every watched parameter, by index, and what the open step read from them.

    Each parameter is reported under its closest watched module (``module`` for its
    weight/bias, ``module.rest`` otherwise); parameters outside every watched module (a ViT's
    ``cls_token``) under their owner, unless ``restricted`` (``include`` chose the modules).
    ``on_gone(token)`` is called when an optimizer seen here no longer exists."""

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[ModuleInfo],
        restricted: bool,
        on_gone: Callable[[Hashable], None],
    ) -> None:
        self.params: list[Param] = []
        self._index: dict[int, int] = {}  # id(tensor) -> index in params
        self._discover(model, {("" if m.name == ROOT_NAME else m.name): m for m in modules},
                       restricted)
        self.by_topic: dict[str, list[int]] = {
            topic: [i for i, p in enumerate(self.params) if p.kind == kind]
            for kind_topics in (VALUE_TOPICS, GRADIENT_TOPICS, UPDATE_TOPICS)
            for kind, topic in kind_topics.items()
        }
        # FSDP2, tensor parallelism: the bus sees the step's payloads as shards
        self.sharded = any(is_dtensor(p.tensor) for p in self.params)
        self.snapshot: dict[int, torch.Tensor] = {}  # param index -> buffer (-> update)
        self.grads: dict[int, Versioned] = {}
        self.updates: dict[int, torch.Tensor] = {}
        # optimizer -> (its param groups' sizes, watched parameter indices, clock token)
        self._optimizers: weakref.WeakKeyDictionary[
            Any, tuple[tuple[int, ...], list[int], int]
        ] = weakref.WeakKeyDictionary()
        self._on_gone = on_gone

    def _discover(
        self, model: nn.Module, selected: dict[str, ModuleInfo], restricted: bool
    ) -> None:
        owners = dict(model.named_modules())
        for full, p in model.named_parameters(remove_duplicate=False):
            found = self._index.get(id(p))
            if found is not None:
                self.params[found].aliases.append(full)  # tied: one tensor, one report
                continue
            owner = full.rpartition(".")[0]
            prefix = owner
            while prefix not in selected and prefix:
                prefix = prefix.rpartition(".")[0]
            if prefix in selected:
                info = selected[prefix]
                rel = full[len(prefix) + 1 :] if prefix else full
            elif not restricted:
                info = ModuleInfo(name=owner or ROOT_NAME, type=type(owners[owner]).__name__)
                rel = full.rpartition(".")[2]
            else:
                continue
            self._index[id(p)] = len(self.params)
            self.params.append(Param(info, key_of(info.name, rel), full, p))

    # ------------------------------------------------------------ optimizers
    def of_optimizer(self, optimizer: Any) -> tuple[list[int], int]:
        """Indices of the watched parameters ``optimizer`` holds, and its token for the
        clock (forgotten through ``on_gone`` when the optimizer is gone)."""
        groups = optimizer.param_groups
        signature = tuple(len(g["params"]) for g in groups)
        cached = self._optimizers.get(optimizer)
        if cached is None or cached[0] != signature:
            index = self._index
            found = sorted({index[id(p)] for g in groups for p in g["params"] if id(p) in index})
            if cached is None:
                token = next(_TOKENS)
                weakref.finalize(optimizer, self._on_gone, token)
            else:
                token = cached[2]
            cached = self._optimizers[optimizer] = (signature, found, token)
        return cached[1], cached[2]

    def seen(self, optimizer: Any) -> tuple[list[int], int] | None:
        """:meth:`of_optimizer` for an optimizer already seen, else None."""
        cached = self._optimizers.get(optimizer)
        return None if cached is None else (cached[1], cached[2])

    def optimizer_exists(self) -> bool:
        """Whether a live torch optimizer holds some watched parameter, looked up among the
        objects the garbage collector tracks (the clock asks at most once)."""
        optimizer = torch.optim.Optimizer
        # type(), not isinstance(): isinstance reads __class__, which some objects
        # compute (deprecated torch attributes warn when it is read)
        return any(
            issubclass(type(obj), optimizer) and bool(self.of_optimizer(obj)[0])
            for obj in gc.get_objects()
        )

    # ------------------------------------------------------------- the step
    def read_grads(self, indices: Iterable[int], wanted: frozenset[str]) -> None:
        """Stash ``p.grad`` of the parameters whose gradient topic is wanted."""
        if wanted.isdisjoint(_GRADIENTS):
            return
        for i in indices:
            p = self.params[i]
            if GRADIENT_TOPICS[p.kind] in wanted:
                grad = p.tensor.grad
                if grad is not None:
                    self.grads[i] = (grad, grad._version)

    def accumulated(self, index: int, tensor: torch.Tensor) -> None:
        """A gradient was accumulated (loops without an optimizer)."""
        if tensor.grad is not None:
            self.grads[index] = (tensor.grad, tensor.grad._version)

    def take_snapshot(self, indices: list[int], wanted: frozenset[str]) -> None:
        """Copy the parameters whose update topic is wanted, negated (one pass each);
        :meth:`take_updates` turns the copies into the updates. The previous step's copies
        are let go first, so that the allocator can hand their memory to the new ones."""
        if wanted.isdisjoint(_UPDATES):
            return
        chosen = [i for i in indices if UPDATE_TOPICS[self.params[i].kind] in wanted]
        if not chosen:
            return
        params = self.params
        # DTensors (FSDP2, tensor parallelism): the snapshot is of the local shards, plain
        # tensors, so the foreach ops apply and no rank holds more than its shard
        sources: list[torch.Tensor] = [
            _local(params[i].tensor) if self.sharded else params[i].tensor for i in chosen]
        for i in chosen:
            self.snapshot.pop(i, None)
        with torch.no_grad():
            negated = torch._foreach_neg(sources)
        for i, buf in zip(chosen, negated, strict=True):
            self.snapshot[i] = self.updates[i] = buf

    def take_updates(self, indices: list[int]) -> None:
        """-before + after, in place (one pass each): each snapshot becomes its update."""
        chosen = [i for i in indices if i in self.updates]
        if not chosen:
            return
        bufs = [self.updates[i] for i in chosen]
        with torch.no_grad():
            after: list[torch.Tensor] = [
                _local(self.params[i].tensor) if self.sharded else self.params[i].tensor
                for i in chosen]
            torch._foreach_add_(bufs, after)

    def gradients_reset(self) -> bool:
        """Whether a gradient read in the open step was reset (``zero_grad``) or changed
        (GradScaler's unscaling) since: without an optimizer step, the attempt was skipped."""
        params = self.params
        return any(params[i].tensor.grad is not grad or grad._version != version
                   for i, (grad, version) in self.grads.items())

    def take_step(self) -> tuple[dict[int, Versioned], dict[int, torch.Tensor]]:
        """The step's gradients and updates, forgotten here."""
        taken = (self.grads, self.updates)
        self.grads, self.updates = {}, {}
        return taken

    def payloads(
        self,
        wanted: frozenset[str],
        grads: dict[int, Versioned],
        updates: dict[int, torch.Tensor],
        valid: Callable[[Versioned, str, int], torch.Tensor | None],
    ) -> dict[str, TopicPayloads]:
        """The step's parameter topics: values, gradients still ``valid`` (not changed in
        place since they were read), updates."""
        out: dict[str, TopicPayloads] = {}
        params = self.params
        for topic in wanted:
            indices = self.by_topic.get(topic)
            if indices is None:
                continue
            chosen: list[tuple[int, torch.Tensor]]
            if topic in _VALUES:
                chosen = [(i, params[i].tensor) for i in indices]
            elif topic in _GRADIENTS:
                chosen = [(i, g) for i in indices
                          if i in grads and (g := valid(grads[i], topic, i)) is not None]
            else:
                chosen = [(i, _like(updates[i], params[i].tensor) if self.sharded
                           else updates[i]) for i in indices if i in updates]
            if chosen:
                out[topic] = TopicPayloads(
                    topic=topic,
                    keys=[params[i].key for i, _ in chosen],
                    modules=[params[i].info for i, _ in chosen],
                    data=[t for _, t in chosen],
                )
        return out


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (none can exist before
    that module is imported, so this never imports it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local tensor of a DTensor, the tensor itself
    otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` (a snapshot of ``param``'s local tensor) laid out as ``param``: a DTensor
    with its mesh and placements when ``param`` is one (no communication)."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    assert isinstance(param, DTensor)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
