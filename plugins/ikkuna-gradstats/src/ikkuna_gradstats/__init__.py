"""Ikkuna plugin ``gradstats``: Cockpit's per-sample gradient statistics from the module inputs
and output gradients the Exporter already captures (no BackPACK, no per-sample gradients in
memory where avoidable)."""

from .subscribers import (
    Alpha,
    Distance,
    EarlyStopping,
    GradHist2d,
    InnerTest,
    MeanGSNR,
    NormTest,
    OrthoTest,
)

__all__ = [
    "Alpha",
    "Distance",
    "EarlyStopping",
    "GradHist2d",
    "InnerTest",
    "MeanGSNR",
    "NormTest",
    "OrthoTest",
]
