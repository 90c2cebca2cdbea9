"""Which modules and parameters an Exporter watches, and the wrappers it looks through."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["ROOT_NAME", "check_depth", "modules_of", "select_modules", "unwrap_model"]

#: The name the model itself is reported under when it is a watched module.
ROOT_NAME = "model"


def check_depth(depth: int) -> None:
    if depth == 0 or depth < -1:
        raise ValueError(f"depth must be -1 (leaves) or >= 1, got {depth}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose names users know: the model inside DistributedDataParallel /
    DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def select_modules(
    model: nn.Module, depth: int = -1, include: Sequence[type[nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules the Exporter watches, as (dotted name, module).

    ``depth=-1`` selects the leaves; ``depth=d`` selects the modules ``d`` levels below the
    model plus shallower leaves, so every part of the model is covered. With ``include``,
    every module of those classes down to ``depth`` (any depth for -1) is selected instead.
    The model itself is called ``"model"`` when it is selected. Wrappers (DDP,
    ``torch.compile``) are looked through.
    """
    check_depth(depth)
    model = unwrap_model(model)
    include_t = tuple(include) if include else None
    chosen = []
    for name, module in model.named_modules():
        level = 0 if name == "" else name.count(".") + 1
        is_leaf = next(module.children(), None) is None
        if include_t is not None:
            ok = isinstance(module, include_t) and (depth < 0 or level <= depth)
        elif depth < 0:
            ok = is_leaf
        else:
            ok = level == depth or (is_leaf and level < depth)
        if ok:
            chosen.append((name or ROOT_NAME, module))
    return chosen


def modules_of(names: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """Resolve ``torch.nn`` class names (``"Conv2d"``) or dotted class paths
    (``"transformers.pytorch_utils.Conv1D"``) for the ``include`` option."""
    out = []
    for name in names:
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), attr, None)
            except ImportError as exc:
                raise ValueError(f"include: cannot import {name!r}: {exc}") from None
        else:
            cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(
                f"include: {name!r} is not a torch.nn module class (e.g. 'Conv2d', or a dotted "
                "path such as 'transformers.pytorch_utils.Conv1D')"
            )
        out.append(cls)
    return tuple(out)
