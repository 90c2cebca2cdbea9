"""The old import path of the Exporter (``ikkuna_core.exporter``); the Exporter lives in
:mod:`ikkuna_core._exporter`, its public names are in ``ikkuna_core``."""

from ._exporter import Exporter, modules_of, select_modules, unwrap_model

__all__ = ["Exporter", "modules_of", "select_modules", "unwrap_model"]
