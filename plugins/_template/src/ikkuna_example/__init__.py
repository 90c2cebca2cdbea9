"""ikkuna-example: a template plugin with two subscribers, ``mean_abs`` (per module) and
``max_abs`` (step level)."""

from .subscribers import MaxAbs, MeanAbs, MeanAbsOptions

__all__ = ["MaxAbs", "MeanAbs", "MeanAbsOptions"]

__version__ = "0.1.0"
