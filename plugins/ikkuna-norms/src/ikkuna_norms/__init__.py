"""ikkuna-norms: p-norms (per module and whole-network), spectral norms, norm ratios, means
and variances of any topic.

Enable it with ``plugins = ["norms"]`` in a run configuration; its subscribers are ``norm``,
``global_norm``, ``spectral_norm``, ``ratio``, ``mean`` and ``variance``.
"""

from .subscribers import (
    GlobalNorm,
    GlobalNormOptions,
    Mean,
    MeanOptions,
    Norm,
    NormOptions,
    Ratio,
    RatioOptions,
    SpectralNorm,
    SpectralNormOptions,
    Variance,
    VarianceOptions,
)

__all__ = [
    "GlobalNorm",
    "GlobalNormOptions",
    "Mean",
    "MeanOptions",
    "Norm",
    "NormOptions",
    "Ratio",
    "RatioOptions",
    "SpectralNorm",
    "SpectralNormOptions",
    "Variance",
    "VarianceOptions",
]

__version__ = "0.1.0"
