"""ikkuna-example: a template plugin with two subscribers, ``mean_abs`` (per module) and
``max_abs`` (step level), and a backend, ``jsonl``."""

from .backends import JsonLinesBackend
from .subscribers import MaxAbs, MeanAbs, MeanAbsOptions

__all__ = ["JsonLinesBackend", "MaxAbs", "MeanAbs", "MeanAbsOptions"]

__version__ = "0.1.0"
