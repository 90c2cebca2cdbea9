"""ikkuna-curvature: condition numbers of the weights and the curvature of the loss — the
Hessian's largest eigenvalue and trace, and the gradient noise scale.

Enable it with ``plugins = ["curvature"]`` in a run configuration; its subscribers are
``condition_number``, ``hessian_max_eigenvalue``, ``hessian_trace`` and
``gradient_noise_scale``. The maths is in :mod:`ikkuna_curvature.ops`, as plain functions of
tensors and modules.
"""

from .subscribers import (
    ConditionNumber,
    ConditionNumberOptions,
    GradientNoiseScale,
    GradientNoiseScaleOptions,
    HessianMaxEigenvalue,
    HessianMaxEigenvalueOptions,
    HessianTrace,
    HessianTraceOptions,
)

__all__ = [
    "ConditionNumber",
    "ConditionNumberOptions",
    "GradientNoiseScale",
    "GradientNoiseScaleOptions",
    "HessianMaxEigenvalue",
    "HessianMaxEigenvalueOptions",
    "HessianTrace",
    "HessianTraceOptions",
]

__version__ = "0.1.0"
