"""ikkuna-health: where a non-finite value began, and norm spikes, watched every step."""

from __future__ import annotations

from .nonfinite import Finding, NonFinite, NonFiniteError, NonFiniteOptions
from .spikes import SpikeOptions, Spikes

__all__ = ["Finding", "NonFinite", "NonFiniteError", "NonFiniteOptions", "SpikeOptions", "Spikes"]
