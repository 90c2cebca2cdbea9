"""The compiled metric path (opt-in: :func:`ikkuna_core.ops.compiled`, or
``compile_metrics = true`` in a run configuration): :func:`ikkuna_core.ops.histograms` as one
``torch.compile``-d graph with static shapes, so that a step's ~60 small aten ops (each
2-5 µs of dispatch on the CPU) become one generated kernel.

The graph computes what the eager path (``ops._binned``) does, in a form the compiler
vectorises: the non-finite entries are masked with ``where`` on ``x - x == 0`` (inductor's
``nan_to_num`` is a scalar loop, seven times slower than eager's), the counts are one
``index_add_`` of ones (``bincount`` has a data-dependent shape). Counts, edges, min, max,
num and nonfinite equal the eager path's bit for bit; the sums differ by float32 rounding
(each 64-entry chunk is summed in float32 in another order). This module is imported only
when the compiled path is first used: ``import ikkuna_core`` never loads ``torch._dynamo``.

Each distinct call (number of tensors, their shapes and dtypes, bins, range, sampling) is one
compilation; at most :data:`MAX_SIGNATURES` are made per process, further ones run eagerly.
A compilation that fails warns once and leaves that backend on the eager path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

__all__ = ["MAX_SIGNATURES", "histograms", "reset"]

#: Distinct calls compiled per process (one graph each); calls beyond run eagerly.
MAX_SIGNATURES = 8
_GRAIN = 64  # as ops._GRAIN: the rows are padded to whole chunks of this many entries

_functions: dict[str, Callable[..., Any]] = {}  # backend -> the compiled graph
_signatures: dict[str, set[Hashable]] = {}  # backend -> the calls compiled so far
_failed: set[str] = set()  # backends whose compilation failed (eager from then on)


def reset() -> None:
    """Forget every compiled graph (and failure): the next calls compile afresh."""
    _functions.clear()
    _signatures.clear()
    _failed.clear()


def histograms(
    rows: Sequence[torch.Tensor], indices: Sequence[torch.Tensor | None], layout: Any,
    bins: int, range: tuple[float, float] | None,  # noqa: A002 - mirrors ops.histograms
    limits: tuple[torch.Tensor, torch.Tensor] | None, backend: str,
) -> tuple[torch.Tensor, ...] | None:
    """The fields of :class:`ikkuna_core.ops.Histograms` of ``rows`` (each sampled at
    ``indices[i]`` when that is not None), by the compiled graph; None when this call is to
    run eagerly (the backend failed, or :data:`MAX_SIGNATURES` calls are compiled already)."""
    if backend in _failed:
        return None
    signature = (
        tuple((tuple(t.shape), t.stride(), t.dtype, i is None) for t, i in zip(rows, indices,
                                                                            strict=True)),
        rows[0].device, bins, range, limits is None,
    )
    seen = _signatures.setdefault(backend, set())
    if signature not in seen:
        if len(seen) >= MAX_SIGNATURES:
            return None
        seen.add(signature)
    fn = _functions.get(backend)
    if fn is None:
        fn = _functions[backend] = torch.compile(_graph, backend=backend, dynamic=False)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in rows) else torch.float32
    try:
        with torch.no_grad():
            return fn(  # type: ignore[no-any-return]
                [t.detach() for t in rows], list(indices), layout.chunk_rows, layout.offsets,
                layout.positions, layout.blank, layout.padding, layout.numel, layout.ramp,
                limits, layout.width, bins, range, dtype,
            )
    except Exception as exc:  # noqa: BLE001 - any failure of the compiler: the eager path
        _failed.add(backend)
        cause = getattr(exc, "inner_exception", None) or exc  # dynamo's BackendCompilerFailed
        said = (str(cause).strip().splitlines() or [""])[0][:300]
        warnings.warn(
            f"ikkuna: compiling the metric path with torch.compile(backend={backend!r}) "
            f"failed ({type(cause).__name__}: {said}); the metrics are computed eagerly "
            "from now on (same values, the ordinary speed)",
            RuntimeWarning, stacklevel=4,  # the caller of ops.histograms
        )
        return None


def _graph(
    rows: list[torch.Tensor], indices: list[torch.Tensor | None], chunk_rows: torch.Tensor,
    offsets: torch.Tensor, positions: torch.Tensor, blank: torch.Tensor,
    padding: torch.Tensor, numel: torch.Tensor, ramp: torch.Tensor,
    limits: tuple[torch.Tensor, torch.Tensor] | None, width: int, bins: int,
    range: tuple[float, float] | None, dtype: torch.dtype,  # noqa: A002
) -> tuple[torch.Tensor, ...]:
    """What ``ops._binned`` computes (see there), as one graph."""
    n = len(rows)
    pieces = []
    for row, index in zip(rows, indices, strict=True):
        x = (torch.take(row, index) if index is not None else row.reshape(-1)).to(dtype)
        pieces.append(x)
        pad = -x.numel() % _GRAIN if x.numel() else _GRAIN
        if pad:
            pieces.append(x.new_full((pad,), math.nan))
    chunks = torch.cat(pieces).view(-1, _GRAIN)
    finite = (chunks - chunks) == 0  # False for NaN and +-inf
    as_minus_inf = torch.where(finite, chunks, -math.inf)
    lo_all, hi_all, sums = _statistics(chunks, finite, as_minus_inf, positions, blank, n, width)
    if limits is not None:
        lo_all, hi_all = (x.to(chunks.device, torch.float64) for x in limits)
        empty = ~torch.isfinite(lo_all)
        lo_all, hi_all = lo_all.masked_fill(empty, 0.0), hi_all.masked_fill(empty, 0.0)
    if range is not None:
        lo = torch.full((n,), float(range[0]), dtype=torch.float64, device=chunks.device)
        hi = torch.full((n,), float(range[1]), dtype=torch.float64, device=chunks.device)
    else:
        lo = lo_all
        hi = torch.where(hi_all > lo_all, hi_all, lo_all + 1e-12 + lo_all.abs() * 1e-6)
    span = hi - lo
    scale = (bins / span).clamp_max(torch.finfo(dtype).max)
    per_chunk = torch.stack([lo, scale], dim=1).to(dtype).index_select(0, chunk_rows)
    buckets = ((as_minus_inf - per_chunk[:, :1]) * per_chunk[:, 1:]).clamp_max(bins - 1)
    buckets = torch.where((buckets - buckets) == 0, buckets, bins + 1.0)
    if range is not None:  # finite values outside the range: bucket `bins`
        inside = chunks.clamp(range[0], range[1]) == chunks
        buckets = torch.where(inside, buckets, torch.where(finite, float(bins), bins + 1.0))
    index = (buckets.to(offsets.dtype) + offsets).view(-1).long()
    counts = torch.zeros(n * (bins + 2), dtype=torch.int64, device=chunks.device)
    counts = counts.index_add(0, index, torch.ones_like(index)).view(n, bins + 2)
    nonfinite = counts[:, bins + 1] - padding
    edges = lo[:, None] + (span / bins)[:, None] * ramp
    return (counts[:, :bins], edges, lo_all, hi_all, numel - nonfinite, sums[:, 0], sums[:, 1],
            nonfinite)


def _statistics(
    chunks: torch.Tensor, finite: torch.Tensor, as_minus_inf: torch.Tensor,
    positions: torch.Tensor, blank: torch.Tensor, n: int, width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's smallest and largest finite value (0 and 0 without any) and the sum and
    sum of squares of its finite values, from its chunks' (as ``ops._row_statistics``)."""
    values = torch.where(finite, chunks, 0.0)
    per_chunk = torch.stack([
        as_minus_inf.amax(1), torch.where(finite, chunks, math.inf).amin(1), values.sum(1),
        (values * values).sum(1),
    ], dim=1).double()
    per_row = blank.index_copy(0, positions, per_chunk).view(n, width, 4)
    hi = per_row[:, :, 0].amax(1)
    empty = hi == -math.inf
    lo = per_row[:, :, 1].amin(1).masked_fill(empty, 0.0)
    return lo, hi.masked_fill(empty, 0.0), per_row[:, :, 2:].sum(1)
