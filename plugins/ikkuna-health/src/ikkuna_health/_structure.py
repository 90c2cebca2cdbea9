"""How the watched modules connect, learned once from one training forward: the order in
which they run and, for each module, which module produced its input. The localisation
needs both (the first module in execution order whose output is non-finite while its input
was finite; the module whose input gradient is non-finite while its output gradient was
finite) and reads them only at a step that has a non-finite value."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ikkuna_core import ROOT_NAME, unwrap_model

#: The producer of a module's input when that input is the model's own input.
INPUT = "input_data"


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, subclasses)
        return None


class Structure:
    """Execution order (activation keys, ``name#k`` for a module's k-th call in a forward)
    and producers (key -> the key whose output the module took as its first tensor input,
    :data:`INPUT` for the model's input, absent when unknown), learned from one forward."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.producer: dict[str, str] = {}
        self.learned = False
        self._handles: list[RemovableHandle] = []
        self._calls: dict[str, int] = {}
        self._outputs: list[tuple[str, int | None, weakref.ref[torch.Tensor]]] = []
        self._input: int | None = None
        self._forwards = 0

    def start(self, model: nn.Module, names: list[str]) -> None:
        """Hook the watched modules (``names``, as the Exporter calls them) for the next
        training forward of ``model``; :meth:`finish` removes the hooks."""
        inner = unwrap_model(model)
        modules = dict(inner.named_modules())
        self._handles.append(model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for name in names:
            module = modules.get("" if name == ROOT_NAME else name)
            if module is not None:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _on_model(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        # kwargs may be missing: torch still calls a hook removed by an earlier pre-hook of
        # the same forward (a skipped step is delivered from the Exporter's), without them
        if self._handles and module.training and torch.is_grad_enabled():
            self._forwards += 1
            if self._forwards == 1:
                data = _first_tensor(args)
                if data is None:
                    data = _first_tensor(kwargs)
                self._input = None if data is None else _storage(data)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._forwards != 1 or not (module.training and torch.is_grad_enabled()):
                return
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            key = name if call == 0 else f"{name}#{call}"
            self.order.append(key)
            inp = _first_tensor(args)
            if inp is not None:
                where = _storage(inp)
                # the latest module before this one whose output shares the input's storage
                # (an in-place ReLU's output is its input's: the ReLU, not the layer before)
                for other, storage, alive in reversed(self._outputs):
                    # a storage address is compared only while its output lives (a freed
                    # one may be reused by a later tensor)
                    if where is not None and storage == where and alive() is not None:
                        self.producer[key] = other
                        break
                else:
                    if where is not None and where == self._input:
                        self.producer[key] = INPUT
            out = _first_tensor(output)
            if out is not None:  # not kept alive: that forward's peak memory stays the same
                self._outputs.append((key, _storage(out), weakref.ref(out)))

        return hook

    def finish(self) -> None:
        """Remove the hooks; what one forward taught is kept (nothing if none ran)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()
        self.learned = bool(self.order)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def consumers(self, key: str) -> list[str]:
        """The modules whose input ``key`` produced, in execution order."""
        return [k for k in self.order if self.producer.get(k) == key]
