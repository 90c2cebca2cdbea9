"""The core's own plugin: the built-in backends. Registered by every plugin registry."""

from __future__ import annotations

from .backends.base import Backend
from .hookspecs import hookimpl


@hookimpl
def ikkuna_backends() -> list[type[Backend]]:
    from .backends.matplotlib import MatplotlibBackend
    from .backends.tensorboard import TensorBoardBackend

    return [TensorBoardBackend, MatplotlibBackend]
