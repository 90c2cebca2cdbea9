"""ikkuna-histograms: per-module histograms of any topic, binned on the training device, and
the fraction of dead (exactly zero) activations.

Enable it with ``plugins = ["histograms"]`` in a run configuration; its subscribers are
``histogram`` and ``dead_fraction``. With the ``matplotlib`` backend every histogram topic
is also drawn as a "colorful dimension" image (steps x values, colour = count) per module.
"""

from .subscribers import (
    DEAD_MODULE_TYPES,
    DeadFraction,
    DeadFractionOptions,
    Histogram,
    HistogramOptions,
)

__all__ = [
    "DEAD_MODULE_TYPES",
    "DeadFraction",
    "DeadFractionOptions",
    "Histogram",
    "HistogramOptions",
]

__version__ = "0.1.0"
