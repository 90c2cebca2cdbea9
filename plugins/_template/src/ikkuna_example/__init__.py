"""ikkuna-example: a template plugin with one subscriber, ``mean_abs``."""

from .subscribers import MeanAbs, MeanAbsOptions

__all__ = ["MeanAbs", "MeanAbsOptions"]

__version__ = "0.1.0"
