"""Fused primitives: reductions of many tensors at once, a handful of kernel launches per
call whatever the number of tensors. Step-level subscribers reduce all modules' payloads of a
step with these; every result stays a tensor on the payloads' device (no host
synchronisation), one value (or one histogram row) per input tensor, in input order.

- :func:`norms` — p-norms through ``torch._foreach_norm``
- :func:`shared_norms` — within it, :func:`norms` reduces each tensor once per ``p`` (the
  subscribers of one step share their payloads' norms)
- :func:`finiteness` — per tensor a 0-d value that is non-finite iff the tensor has a
  non-finite entry (what the capture keeps of a payload that is only checked for NaN/inf)
- :func:`zero_fractions` — fraction of exact zeros (``_foreach_norm`` with p = 0)
- :func:`zero_counts` — entries and exact zeros of each tensor (zero fractions of shards)
- :func:`moments` — means and variances, by segments of one concatenation
- :func:`partial_moments` / :func:`merged_moments` — counts, sums and sums of squares of
  shards, and the means and variances of their merge
- :func:`finite_extremes` — smallest and largest finite values (a histogram's edges, agreed
  across shards before the counts)
- :func:`histograms` — histograms of many tensors as one flat computation (per-row
  min/max, one affine map to buckets, one bincount), large tensors summarised by a fixed
  pseudo-random sample
- :func:`sample` / :func:`sample_index` — that sample
- :func:`group_by` — indices of tensors sharing a property (e.g. shape, for batched matmuls)
- :func:`constant` — a small host-made tensor on a device, made once (no per-step copy)
- :func:`compiled` — within it, :func:`histograms` runs as one ``torch.compile``-d graph
  (opt-in; off by default)
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import NamedTuple, TypeVar

import torch

__all__ = [
    "Histograms",
    "compiled",
    "constant",
    "finite_extremes",
    "finiteness",
    "group_by",
    "histograms",
    "merged_moments",
    "moments",
    "norms",
    "partial_moments",
    "sample",
    "sample_index",
    "zero_counts",
    "zero_fractions",
]

#: Elements per concatenation in :func:`moments` (bounds its temporary memory).
_CHUNK = 1 << 25

_Key = TypeVar("_Key", bound=Hashable)

#: The torch.compile backend of the compiled metric path in this context (None: eager).
_COMPILE_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ikkuna_compile_backend", default=None
)


#: Within :func:`shared_norms`: (id of a tensor, p) -> (a weak reference to the tensor, so
#: that a later tensor with a freed one's id is told apart, and its 0-d norm).
_SHARED_NORMS: contextvars.ContextVar[
    dict[tuple[int, float], tuple[weakref.ref[torch.Tensor], torch.Tensor]] | None
] = contextvars.ContextVar("ikkuna_shared_norms", default=None)


@contextlib.contextmanager
def shared_norms() -> Iterator[None]:
    """Within this context :func:`norms` reduces each tensor object once per ``p`` and
    hands the same value to every later call that asks for it: two subscribers of a step
    reading the norms of the same gradients cost one pass over them. Only for tensors that
    do not change inside it: the bus enters it around the subscribers of each step, whose
    payloads they must not change in place."""
    token = _SHARED_NORMS.set({})
    try:
        yield
    finally:
        _SHARED_NORMS.reset(token)


@contextlib.contextmanager
def compiled(backend: str | None = "inductor") -> Iterator[None]:
    """Within this context :func:`histograms` runs as one graph compiled by
    ``torch.compile(backend=backend, dynamic=False)`` (None: eagerly, as outside it): the
    same counts, edges, extremes and numbers bit for bit, the sums within float32 rounding;
    on the CPU a step's ~60 small ops become one generated kernel. Each distinct call
    (tensor count and shapes, bins, range) compiles once, the first time (seconds), at most
    8 per process; a compilation that fails warns once and the eager path takes over. Under
    a ``TorchDispatchMode`` or inside a ``torch.compile``-d region the eager path runs.
    ``compile_metrics = true`` in a run configuration enters it around the delivery of
    every step."""
    token = _COMPILE_BACKEND.set(backend)
    try:
        yield
    finally:
        _COMPILE_BACKEND.reset(token)


def _device_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` by device (one group in the usual single-device case)."""
    first = tensors[0].device
    if all(t.device == first for t in tensors):
        return [list(range(len(tensors)))]
    return list(group_by(tensors, lambda t: t.device).values())


def _input_order(groups: list[list[int]], device: torch.device) -> torch.Tensor:
    """The index that puts rows computed group after group (``groups``, as from
    :func:`_device_groups`) back in input order, as a cached constant on ``device``."""
    position = [0] * sum(len(idx) for idx in groups)
    for row, i in enumerate(i for idx in groups for i in idx):
        position[i] = row
    return constant(position, torch.long, device)


def _per_device(
    tensors: Sequence[torch.Tensor], fn: Callable[[list[torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn`` (tensors -> one row per tensor) per device; the rows on the first tensor's
    device, in input order."""
    groups = _device_groups(tensors)
    if len(groups) == 1:
        return fn(list(tensors))
    device = tensors[0].device
    rows = [fn([tensors[i] for i in idx]).to(device) for idx in groups]
    return torch.cat(rows).index_select(0, _input_order(groups, device))


_CONSTANTS: dict[tuple[tuple[float, ...], torch.dtype, torch.device], torch.Tensor] = {}


def constant(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, cached: a step's bookkeeping vectors (sizes,
    positions) are copied to an accelerator once, not every step (such a copy from pageable
    memory would synchronise with the device)."""
    key = (tuple(values), dtype, device)
    found = _CONSTANTS.get(key)
    if found is None:
        if len(_CONSTANTS) > 4096:
            _CONSTANTS.clear()
        found = _CONSTANTS[key] = torch.tensor(key[0], dtype=dtype).to(device)
    return found


def _floating(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_floating_point() else t.float() for t in tensors]


def norms(tensors: Sequence[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """``(sum |x|^p)^(1/p)`` of each tensor (``p = inf``: the largest ``|x|``), as one float32
    vector; low-precision tensors are reduced in float32."""
    if not tensors:
        return torch.empty(0)
    shared = _SHARED_NORMS.get()
    if shared is not None and not torch.compiler.is_compiling():
        return _shared_norms(tensors, p, shared)

    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(_floating(ts), p, dtype=torch.float32))

    return _per_device(tensors, fn)


def _shared_norms(
    tensors: Sequence[torch.Tensor], p: float,
    shared: dict[tuple[int, float], tuple[weakref.ref[torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    """:func:`norms` within :func:`shared_norms`: the tensors not reduced yet in one
    ``_foreach_norm`` per device, then every value from ``shared``."""

    def known(t: torch.Tensor) -> bool:
        entry = shared.get((id(t), p))
        return entry is not None and entry[0]() is t

    todo = {id(t): t for t in tensors if not known(t)}
    if todo:
        fresh = list(todo.values())
        for idx in _device_groups(fresh):
            group = [fresh[i] for i in idx]
            values = torch._foreach_norm(_floating(group), p, dtype=torch.float32)
            for t, value in zip(group, values, strict=True):
                shared[(id(t), p)] = (weakref.ref(t), value)
    found = [shared[(id(t), p)][1] for t in tensors]
    device = tensors[0].device
    return torch.stack([v if v.device == device else v.to(device) for v in found])


def finiteness(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per floating-point tensor a 0-d float32 that is non-finite iff the tensor has a NaN
    or an inf entry, one ``_foreach_norm`` per device: the largest ``|x|`` on an accelerator
    (exact); on the CPU the L2 norm, 20 times faster there, which is also non-finite when the
    sum of squares leaves float32's range (entries around 1e19 and above)."""
    out: list[torch.Tensor] = list(tensors)
    if not tensors:
        return out
    for idx in _device_groups(tensors):
        group = [tensors[i] for i in idx]
        p = 2.0 if group[0].device.type == "cpu" else math.inf
        for i, value in zip(idx, torch._foreach_norm(group, p, dtype=torch.float32), strict=True):
            out[i] = value
    return out


def zero_fractions(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fraction of exactly-zero entries of each tensor (NaN for an empty tensor)."""
    if not tensors:
        return torch.empty(0)

    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        nonzero = torch.stack(torch._foreach_norm(_floating(ts), 0, dtype=torch.float32))
        numel = constant([t.numel() for t in ts], torch.float32, nonzero.device)
        return (numel - nonzero) / numel

    return _per_device(tensors, fn)


def zero_counts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n, 2)`` float64: each tensor's number of exact zeros and of entries — what the
    shards of a tensor sum to give its :func:`zero_fractions` (zeros / entries)."""
    if not tensors:
        return torch.empty(0, 2, dtype=torch.float64)
    device = tensors[0].device
    numel = constant([t.numel() for t in tensors], torch.float64, device)
    nonzero = torch.stack([torch.count_nonzero(t).to(device) for t in tensors]).double()
    return torch.stack([numel - nonzero, numel], dim=1)


def moments(
    tensors: Sequence[torch.Tensor], correction: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (``sum (x - mean)^2 / (n - correction)``) of each tensor, as two
    float32 vectors. Each tensor's values are shifted by its first entry before summing, so
    the variance keeps its precision when the mean is large against the spread."""
    if not tensors:
        return torch.empty(0), torch.empty(0)
    rows = [
        _per_device(chunk, lambda ts: torch.stack(_moments(ts, correction), dim=1))
        for chunk in _chunks(tensors)
    ]
    both = torch.cat(rows).float()
    return both[:, 0], both[:, 1]


def partial_moments(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n, 3)`` float64: each tensor's number of entries, sum and sum of squares — the
    moments of shards, which merge by summing (:func:`merged_moments` finishes them)."""
    if not tensors:
        return torch.empty(0, 3, dtype=torch.float64)
    sums = []
    for t in tensors:
        x = t.detach().reshape(-1).double()
        sums.append(torch.stack([x.sum(), torch.dot(x, x)]))
    device = tensors[0].device
    counts = constant([t.numel() for t in tensors], torch.float64, device)
    return torch.cat([counts[:, None], torch.stack(sums).to(device)], dim=1)


def merged_moments(
    partials: torch.Tensor, correction: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from summed :func:`partial_moments` rows (float32 vectors, as
    :func:`moments`; NaN for no entries). The sums are float64 and unshifted: exact enough
    unless a tensor's mean exceeds its spread by about 10^5."""
    n, s1, s2 = partials.unbind(1)
    mean = s1 / n
    var = (s2 - s1 * mean).clamp_min(0) / (n - correction)
    return mean.float(), var.float()


def _chunks(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    chunks: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in tensors:
        if chunks[-1] and size + t.numel() > _CHUNK:
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += t.numel()
    return chunks


def _moments(ts: list[torch.Tensor], correction: int) -> tuple[torch.Tensor, torch.Tensor]:
    numels = tuple(t.numel() for t in ts)
    device = ts[0].device
    flat = torch.cat([t.reshape(-1) for t in ts])
    if not flat.is_floating_point() or flat.element_size() < 4:
        flat = flat.float()
    n = constant(numels, torch.float64, device)
    nonempty = [i for i, k in enumerate(numels) if k]
    if len(nonempty) != len(numels):  # segment_reduce wants positive lengths
        mean = torch.full((len(ts),), math.nan, dtype=torch.float64, device=device)
        var = mean.clone()
        if nonempty:
            m, v = _moments([ts[i] for i in nonempty], correction)
            index = constant(nonempty, torch.long, device)
            mean[index], var[index] = m, v
        return mean, var
    lengths = constant(numels, torch.long, device)
    starts = constant(list(itertools.accumulate(numels[:-1], initial=0)), torch.long, device)
    ends = constant(list(itertools.accumulate(numels)), torch.long, device)
    shift = flat.index_select(0, starts)
    shifted = (flat - shift.repeat_interleave(lengths, output_size=flat.numel())).double()
    # segment sums as differences of a running sum: no host synchronisation (segment_reduce
    # has one on CUDA) and the same result on every run (unlike atomic scatter-adds)
    s1 = _segment_sums(shifted, ends)
    s2 = _segment_sums(shifted * shifted, ends)
    mean = shift.double() + s1 / n
    var = (s2 - s1 * s1 / n).clamp_min(0) / (n - correction)
    return mean, var


def _segment_sums(values: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of ``values`` ending (exclusively) at ``ends``."""
    running = torch.cumsum(values, 0)
    at_ends = running.index_select(0, ends - 1)
    return torch.diff(at_ends, prepend=at_ends.new_zeros(1))


class Histograms(NamedTuple):
    """Histograms of n tensors, stacked: row i describes tensor i. ``num`` counts the finite
    values binned (of the sample, for sampled tensors); ``nonfinite`` the NaN/inf values,
    which are never binned."""

    counts: torch.Tensor  # (n, bins), int64
    edges: torch.Tensor  # (n, bins + 1), float64
    min: torch.Tensor  # (n,) smallest finite value (0 when there is none)
    max: torch.Tensor  # (n,)
    num: torch.Tensor  # (n,)
    sum: torch.Tensor  # (n,)
    sum_squares: torch.Tensor  # (n,)
    nonfinite: torch.Tensor  # (n,)


_SAMPLE_CACHE: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def sample_index(numel: int, k: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random choice of ``k`` of ``numel`` positions, sorted (all positions
    when ``numel <= k``), cached per size and device. Its own generator leaves the global RNG
    (and so training) untouched; unlike a stride, it cannot alias with the layout of a
    feature map."""
    key = (numel, k, device)
    idx = _SAMPLE_CACHE.get(key)
    if idx is None:
        if numel <= k:
            idx = torch.arange(numel, device=device)
        else:
            gen = torch.Generator().manual_seed(numel)
            idx = torch.randint(0, numel, (k,), generator=gen).sort().values.to(device)
        if len(_SAMPLE_CACHE) > 1024:
            _SAMPLE_CACHE.clear()
        _SAMPLE_CACHE[key] = idx
    return idx


def sample(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """A 1-d copy of at most ``k`` entries of ``tensor``: all of them (in row-major order)
    when it has no more, otherwise the fixed sample of :func:`sample_index`."""
    return torch.take(tensor, sample_index(tensor.numel(), k, tensor.device))


#: The rows of :func:`histograms` are padded with NaN (never counted) to a multiple of this
#: many entries: their concatenation is then a matrix of chunks, each within one row, so
#: reductions along its rows and a per-chunk broadcast do per-row work without the padding of
#: every row to the longest one.
_GRAIN = 64


class _Layout(NamedTuple):
    """Where rows of given lengths lie in the flat concatenation of :func:`_binned`, and the
    bookkeeping vectors that go with it, made once per lengths, bins and device."""

    pads: tuple[torch.Tensor | None, ...]  # the NaN entries after each row (None: none)
    padding: torch.Tensor  # (n,) int64: how many
    numel: torch.Tensor  # (n,) int64: each row's length
    chunk_rows: torch.Tensor  # (chunks,) int64: the row of each chunk
    offsets: torch.Tensor  # (chunks, 1): each chunk's row's first bucket (int32 on the CPU)
    positions: torch.Tensor  # (chunks,) int64: each chunk's place in an (n, width) matrix
    width: int  # the most chunks of a row
    entries: int  # of the concatenation, padding included
    blank: torch.Tensor  # (n * width, 4) float64 rows of (-inf, inf, 0, 0): no chunk
    ramp: torch.Tensor  # (bins + 1,) float64: 0, 1, ..., bins


_LAYOUTS: dict[tuple[tuple[int, ...], int, torch.device], _Layout] = {}
_PADS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _pad(size: int, device: torch.device) -> torch.Tensor:
    """``size`` NaNs (float32: concatenated with any row, the row's values keep their
    precision), made once per size and device."""
    found = _PADS.get((size, device))
    if found is None:
        found = _PADS[(size, device)] = torch.full((size,), math.nan, device=device)
    return found


def _layout(lengths: tuple[int, ...], bins: int, device: torch.device) -> _Layout:
    """The :class:`_Layout` of rows of ``lengths``; every row, an empty one too, has at least
    one chunk."""
    key = (lengths, bins, device)
    found = _LAYOUTS.get(key)
    if found is None:
        padded = [max(-(-k // _GRAIN), 1) * _GRAIN for k in lengths]
        chunks = torch.tensor([p // _GRAIN for p in padded])
        rows = torch.repeat_interleave(torch.arange(len(lengths)), chunks)
        starts = torch.repeat_interleave(chunks.cumsum(0) - chunks, chunks)
        width = int(chunks.max())
        # bincount on the CPU (fastest there, with int32); scatter_add_ elsewhere (bincount
        # reads its input's maximum back to the host on CUDA)
        index_dtype = torch.int32 if device.type == "cpu" else torch.int64
        found = _Layout(
            pads=tuple(_pad(p - k, device) if p > k else None
                       for p, k in zip(padded, lengths, strict=True)),
            padding=torch.tensor([p - k for p, k in zip(padded, lengths, strict=True)]).to(device),
            numel=torch.tensor(lengths, dtype=torch.int64).to(device),
            chunk_rows=rows.to(device),
            offsets=(rows * (bins + 2))[:, None].to(index_dtype).to(device),
            positions=(rows * width + torch.arange(len(rows)) - starts).to(device),
            width=width,
            entries=sum(padded),
            blank=torch.tensor([-math.inf, math.inf, 0.0, 0.0], dtype=torch.float64)
            .repeat(len(lengths) * width, 1).to(device),
            ramp=torch.arange(bins + 1, dtype=torch.float64).to(device),
        )
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[key] = found
    return found


def histograms(
    tensors: Sequence[torch.Tensor],
    bins: int = 64,
    range: tuple[float, float] | None = None,  # noqa: A002 - mirrors numpy/torch naming
    max_samples: int | None = None,
    limits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Histograms:
    """Histograms of the finite entries of every tensor, as one flat computation on their
    device (no host synchronisation, no padding of rows to the longest). With no ``range``,
    each histogram's bins span its tensor's finite min..max; with ``range``, values outside
    are not counted. With ``max_samples``, a larger tensor is summarised by a fixed
    pseudo-random sample of that many entries (:func:`sample`). Values are binned in their
    own precision (float32 for float32 and lower, float64 for float64): a value within
    rounding of a bin edge may fall in the neighbouring bin from the one ``numpy.histogram``
    (float64) would choose. ``limits``: each
    tensor's (smallest, largest) finite value as two float64 vectors, used instead of its own
    (the shards of one tensor agree on them first, :func:`finite_extremes`, so that their
    counts sum to the whole tensor's); ``min``/``max`` then report them."""
    _check_histograms(tensors, bins, range)
    groups = _device_groups(tensors)
    if len(groups) > 1:
        if limits is not None:
            raise ValueError("histograms with limits needs all tensors on one device")
        parts = [histograms([tensors[i] for i in idx], bins, range, max_samples) for idx in groups]
        device = tensors[0].device
        order = _input_order(groups, device)
        return Histograms(*(
            torch.cat([part.to(device) for part in fields]).index_select(0, order)
            for fields in zip(*parts, strict=True)
        ))
    backend = _COMPILE_BACKEND.get()
    if backend is not None and not _tracing():
        found = _compiled_histograms(tensors, bins, range, max_samples, limits, backend)
        if found is not None:
            return found
    flat = [
        sample(t, max_samples) if max_samples is not None and t.numel() > max_samples
        else _flat(t)
        for t in tensors
    ]
    lengths = tuple(t.numel() for t in flat)
    return _binned(flat, lengths, bins, range, limits)


def _tracing() -> bool:
    """Whether a ``torch.compile`` trace or a ``TorchDispatchMode`` (op counters, fake
    tensors) is active: the compiled path is then left to the eager one."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _compiled_histograms(
    tensors: Sequence[torch.Tensor], bins: int,
    range: tuple[float, float] | None,  # noqa: A002 - mirrors numpy/torch naming
    max_samples: int | None, limits: tuple[torch.Tensor, torch.Tensor] | None, backend: str,
) -> Histograms | None:
    """:func:`histograms` of tensors on one device by the compiled graph; None: this call
    runs eagerly (see :func:`compiled`)."""
    from . import _compiled  # torch._dynamo is loaded only once this path is used

    device = tensors[0].device
    indices = [
        sample_index(t.numel(), max_samples, device)
        if max_samples is not None and t.numel() > max_samples else None
        for t in tensors
    ]
    lengths = tuple(t.numel() if i is None else i.numel() for t, i in zip(tensors, indices,
                                                                           strict=True))
    layout = _layout(lengths, bins, device)
    found = _compiled.histograms(tensors, indices, layout, bins, range, limits, backend)
    return None if found is None else Histograms(*found)


def finite_extremes(
    tensors: Sequence[torch.Tensor], max_samples: int | None = None
) -> torch.Tensor:
    """``(n, 2)`` float64: each tensor's largest finite value and the negated smallest (both
    -inf for none), of the entries :func:`histograms` would bin (the same sample with
    ``max_samples``); rows of shards merge by their maximum."""
    rows = []
    for t in tensors:
        x = sample(t, max_samples) if max_samples is not None and t.numel() > max_samples \
            else t.reshape(-1)
        x = x.detach()
        if x.dtype != torch.float64:
            x = x.float()
        finite = _finite(x)
        hi = torch.where(finite, x, -math.inf).amax() if x.numel() else x.new_tensor(-math.inf)
        lo = torch.where(finite, x, math.inf).amin() if x.numel() else x.new_tensor(math.inf)
        rows.append(torch.stack([hi.double(), -lo.double()]))
    return torch.stack(rows)


def _check_histograms(
    tensors: Sequence[torch.Tensor], bins: int, range: tuple[float, float] | None  # noqa: A002
) -> None:
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if range is not None and not range[0] < range[1]:
        raise ValueError(f"histogram range must be (low, high) with low < high, got {range}")
    if not tensors:
        raise ValueError("histograms needs at least one tensor")


def _binned(
    flat: list[torch.Tensor], lengths: tuple[int, ...], bins: int,
    range: tuple[float, float] | None,  # noqa: A002 - mirrors numpy/torch naming
    limits: tuple[torch.Tensor, torch.Tensor] | None,
) -> Histograms:
    """Histograms of the finite entries of each 1-d tensor of ``flat`` (see
    :func:`histograms`): all rows in one flat concatenation (each padded with NaN to whole
    chunks of :data:`_GRAIN`), each entry's bucket ``row * (bins + 2) + bin`` found by one
    affine map and counted by one ``bincount``. Per row: ``bins`` bins, then one bucket for
    finite values outside ``range`` and one for non-finite values (padding included)."""
    n, device = len(flat), flat[0].device
    layout = _layout(lengths, bins, device)
    pieces = [x for row, pad in zip(flat, layout.pads, strict=True)
              for x in (row, pad) if x is not None]
    data, buckets, as_inf, finite, index = _concatenated(pieces, layout)
    chunks = data.reshape(-1, _GRAIN)
    # the non-finite values as -inf: the largest finite value, then (in place) the buckets
    torch.nan_to_num(chunks, nan=-math.inf, posinf=-math.inf, neginf=-math.inf, out=buckets)
    torch.nan_to_num(chunks, nan=math.inf, posinf=math.inf, neginf=math.inf, out=as_inf)
    torch.nan_to_num(chunks, nan=0.0, posinf=0.0, neginf=0.0, out=finite)
    lo_all, hi_all, sums = _row_statistics(buckets, as_inf, finite, layout, n)
    if limits is not None:  # agreed by the shards of each tensor (all may be empty)
        lo_all, hi_all = (x.to(device, torch.float64) for x in limits)
        empty = ~torch.isfinite(lo_all)
        lo_all, hi_all = lo_all.masked_fill(empty, 0.0), hi_all.masked_fill(empty, 0.0)
    if range is not None:
        lo = constant([float(range[0])] * n, torch.float64, device)
        hi = constant([float(range[1])] * n, torch.float64, device)
    else:
        lo = lo_all
        hi = torch.where(hi_all > lo_all, hi_all, lo_all + 1e-12 + lo_all.abs() * 1e-6)
    width = hi - lo
    # a scale beyond the binned precision's range would make 0 * inf = NaN of the minimum
    scale = (bins / width).clamp_max_(torch.finfo(data.dtype).max)
    per_chunk = torch.stack([lo, scale], dim=1).to(data.dtype).index_select(0, layout.chunk_rows)
    buckets.sub_(per_chunk[:, :1]).mul_(per_chunk[:, 1:]).clamp_max_(bins - 1)
    if range is not None:  # the range's ends compared in the values' precision, as numpy's
        inside = chunks.clamp(range[0], range[1]) == chunks  # False for NaN and +-inf
        buckets = torch.where(inside, buckets, (chunks - chunks).add_(bins))  # NaN: non-finite
    buckets.nan_to_num_(nan=bins + 1, posinf=bins + 1, neginf=bins + 1)
    index = index.copy_(buckets).add_(layout.offsets).view(-1)  # copy_ truncates, as .to
    counts = _bincount(index, n * (bins + 2)).view(n, bins + 2)
    nonfinite = counts[:, bins + 1] - layout.padding
    return Histograms(
        counts=counts[:, :bins],
        edges=lo[:, None] + (width / bins)[:, None] * layout.ramp,
        min=lo_all,
        max=hi_all,
        num=layout.numel - nonfinite,
        sum=sums[:, 0],
        sum_squares=sums[:, 1],
        nonfinite=nonfinite,
    )


def _row_statistics(
    as_minus_inf: torch.Tensor, as_inf: torch.Tensor, finite: torch.Tensor, layout: _Layout,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's smallest and largest finite value (float64; 0 and 0 for a row without
    any) and its finite values' sum and sum of squares (``(n, 2)`` float64), from the
    chunks' own, gathered in a small (n, width) matrix: deterministic, and an overflow stays
    in its row. ``as_minus_inf``, ``as_inf``, ``finite``: the chunks with the non-finite
    values as -inf, inf and 0."""
    per_chunk = torch.stack([as_minus_inf.amax(1), as_inf.amin(1), finite.sum(1),
                             torch.linalg.vecdot(finite, finite)], dim=1).double()
    per_row = layout.blank.clone().index_copy_(0, layout.positions, per_chunk)
    per_row = per_row.view(n, layout.width, 4)
    hi = per_row[:, :, 0].amax(1)
    empty = hi == -math.inf  # no finite value
    lo = per_row[:, :, 1].amin(1).masked_fill_(empty, 0.0)
    return lo, hi.masked_fill_(empty, 0.0), per_row[:, :, 2:].sum(1)


_WORKSPACES: dict[tuple[torch.device, int], tuple[torch.Tensor, ...]] = {}


def _concatenated(pieces: list[torch.Tensor], layout: _Layout) -> tuple[torch.Tensor, ...]:
    """The concatenation of ``pieces`` (float32, or float64 for float64 data), and four
    (chunks, _GRAIN) buffers for :func:`_binned`: three of its precision, one of the
    layout's index type. The buffers (and the concatenation of float32 or float64 pieces) are
    reused by the next call of this thread with as many entries: on the CPU, five fresh
    buffers of the rows' size a step cost page faults. Nothing :func:`histograms` returns
    aliases them."""
    first = pieces[0]
    dtype, device = first.dtype, first.device
    own = len(pieces) > 1 and dtype in (torch.float32, torch.float64) \
        and all(p.dtype == dtype for p in pieces)
    data = None
    if not own:
        data = torch.cat(pieces) if len(pieces) > 1 else first
        if data.dtype not in (torch.float32, torch.float64):  # half the traffic of float64
            data = data.float()
        dtype = data.dtype
    numel, index_dtype = layout.entries, layout.offsets.dtype
    key = (device, threading.get_ident())
    found = _WORKSPACES.get(key)
    if found is None or found[0].numel() != numel or found[0].dtype != dtype \
            or found[4].dtype != index_dtype:
        if len(_WORKSPACES) > 16:
            _WORKSPACES.clear()
        shape = (numel // _GRAIN, _GRAIN)
        found = _WORKSPACES[key] = (
            torch.empty(numel, dtype=dtype, device=device),
            *(torch.empty(shape, dtype=dtype, device=device) for _ in range(3)),
            torch.empty(shape, dtype=index_dtype, device=device),
        )
    if data is None:
        return (torch.cat(pieces, out=found[0]), *found[1:])
    return (data, *found[1:])


def _bincount(index: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of ``0 .. size - 1`` occurs in ``index`` (int64), without a host
    synchronisation."""
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=size)
    counts = torch.zeros(size, dtype=torch.int64, device=index.device)
    return counts.scatter_add_(0, index, _ones(index))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1)``, without an op for a tensor already 1-d (a captured sample)."""
    return t if t.dim() == 1 else t.reshape(-1)


def _ones(like: torch.Tensor) -> torch.Tensor:
    """A tensor of ones shaped like ``like`` without allocating it (a stride-0 view)."""
    return torch.ones((), dtype=like.dtype, device=like.device).expand(like.shape)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(x)`` in two passes instead of three: ``x - x`` is 0 for a finite value
    and NaN for NaN and +-inf."""
    return (x - x) == 0


def group_by(
    tensors: Sequence[torch.Tensor], key: Callable[[torch.Tensor], _Key]
) -> dict[_Key, list[int]]:
    """Indices of ``tensors`` grouped by ``key(tensor)``, e.g. ``lambda t: (t.shape,
    t.device, t.dtype)`` to stack same-shaped matrices for one batched matmul."""
    groups: dict[_Key, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(key(t), []).append(i)
    return groups
