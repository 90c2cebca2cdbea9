"""``ikkuna_core.ops.histograms`` (the flat path: all rows in one concatenation, one bincount)
row by row against ``numpy.histogram`` of each row's finite values, on rows of different
lengths in one call: constant rows, a row of one entry, empty rows, rows with NaN and
infinities, rows longer than a chunk and not a multiple of it, float64 and float16 rows,
with edges from each row's min/max and with a fixed range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ikkuna_core import ops


def rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    rows = [
        torch.randn(1000, generator=g),  # not a multiple of the 64-entry chunks
        torch.full((37,), 2.5),  # constant: min == max
        torch.tensor([0.75]),  # one entry
        torch.randn(64, generator=g) * 1e-3,  # exactly one chunk
        torch.randn(3, 5, generator=g) * 4,  # 2-d, binned flattened
        torch.tensor([]),  # empty
        torch.tensor([math.nan, math.inf, -math.inf]),  # nothing finite
        torch.randn(129, generator=g, dtype=torch.float64) + 100,
        torch.randn(200, generator=g).to(torch.float16),
        torch.tensor([-1.0, 0.0]),  # min and max only
    ]
    noisy = torch.randn(513, generator=g) * 0.3
    noisy[::17] = math.nan
    noisy[5::41] = math.inf
    noisy[9::53] = -math.inf
    rows.append(noisy)
    return rows


def binned_like_numpy(counts: np.ndarray, values: np.ndarray, lo: float, hi: float,
                      bins: int, precision: type) -> None:
    """``counts`` are numpy's histogram of ``values`` over [lo, hi], but for values within
    the binned precision's rounding of a bin edge, which may each move one count."""
    want, edges = np.histogram(values, bins=bins, range=(lo, hi))
    tol = 4 * np.finfo(precision).eps * (abs(lo) + abs(hi) + (hi - lo))
    near = np.min(np.abs(values[:, None] - edges[None, :]), axis=1) <= tol
    assert np.abs(counts - want).sum() <= 2 * np.count_nonzero(near), (counts, want)


@pytest.mark.parametrize("bins", [64, 7, 1])
def test_each_row_matches_numpy_with_min_max_edges(bins: int) -> None:
    tensors = rows()
    hists = ops.histograms(tensors, bins=bins)
    assert hists.counts.shape == (len(tensors), bins)
    for i, t in enumerate(tensors):
        values = t.double().numpy().ravel()
        finite = values[np.isfinite(values)]
        assert hists.nonfinite[i] == values.size - finite.size
        assert hists.num[i] == finite.size == hists.counts[i].sum()
        if finite.size == 0:  # no finite value: zero edges, nothing binned
            assert hists.min[i] == hists.max[i] == 0
            assert hists.sum[i] == hists.sum_squares[i] == 0
            continue
        lo, hi = finite.min(), finite.max()
        assert hists.min[i] == lo and hists.max[i] == hi
        assert hists.sum[i] == pytest.approx(finite.sum(), rel=1e-5, abs=1e-5)
        assert hists.sum_squares[i] == pytest.approx((finite**2).sum(), rel=1e-5)
        precision = np.float64 if t.dtype == torch.float64 else np.float32
        if lo == hi:  # a constant row: every value in the first bin of a tiny span
            assert hists.counts[i, 0] == finite.size
            assert hists.edges[i, 0] == lo and hists.edges[i, -1] > hi
            continue
        np.testing.assert_allclose(hists.edges[i], np.linspace(lo, hi, bins + 1),
                                   rtol=1e-12, atol=1e-15)
        binned_like_numpy(hists.counts[i].numpy(), finite, lo, hi, bins, precision)
        assert hists.counts[i, 0] >= 1 and hists.counts[i, -1] >= 1  # min and max binned


def test_each_row_matches_numpy_in_a_fixed_range() -> None:
    tensors, bins, (lo, hi) = rows(), 10, (-0.5, 0.8)
    hists = ops.histograms(tensors, bins=bins, range=(lo, hi))
    for i, t in enumerate(tensors):
        values = t.double().numpy().ravel()
        finite = values[np.isfinite(values)]
        np.testing.assert_allclose(hists.edges[i], np.linspace(lo, hi, bins + 1), rtol=1e-12)
        assert hists.num[i] == finite.size  # every finite value, binned or not
        assert hists.nonfinite[i] == values.size - finite.size
        # values outside the range are not counted; an end compared in float32 may differ
        # from numpy's float64 comparison for a value within rounding of it
        precision = np.float64 if t.dtype == torch.float64 else np.float32
        ends = np.array([lo, hi], dtype=precision).astype(np.float64)
        inside = finite[(finite >= ends[0]) & (finite <= ends[1])]
        assert hists.counts[i].sum() == inside.size
        binned_like_numpy(hists.counts[i].numpy(), inside, lo, hi, bins, precision)
    assert hists.counts[7].sum() == 0  # the float64 row lies around 100, outside the range
    assert hists.counts[1].sum() == 0 and hists.num[1] == 37  # 2.5 is outside


def test_edges_of_the_rows_do_not_mix() -> None:
    """Every row's extreme values are binned in its own first and last bin, whatever its
    neighbours' values: a row's buckets never spill into the next row's."""
    g = torch.Generator().manual_seed(9)
    tensors = [torch.rand(k, generator=g) * 10 ** (i - 3) + i for i, k in
               enumerate([1, 2, 63, 64, 65, 127, 128, 4000])]
    hists = ops.histograms(tensors, bins=5)
    for i, t in enumerate(tensors):
        values = t.double().numpy()
        if values.min() < values.max():
            binned_like_numpy(hists.counts[i].numpy(), values, values.min(), values.max(), 5,
                              np.float32)
            assert hists.counts[i, 0] >= 1 and hists.counts[i, -1] >= 1
        else:
            assert hists.counts[i].tolist() == [t.numel(), 0, 0, 0, 0]
        assert hists.counts[i].sum() == t.numel()


def test_a_sample_of_each_large_row() -> None:
    """With ``max_samples``, each larger row is summarised by its fixed sample, the others
    binned whole, in one call."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5000, generator=g), torch.randn(30, generator=g)]
    hists = ops.histograms(tensors, bins=8, max_samples=100)
    sample = ops.sample(tensors[0], 100).double().numpy()
    assert hists.num.tolist() == [100, 30]
    for i, values in enumerate([sample, tensors[1].double().numpy()]):
        lo, hi = values.min(), values.max()
        assert hists.min[i] == lo and hists.max[i] == hi
        binned_like_numpy(hists.counts[i].numpy(), values, lo, hi, 8, np.float32)


def test_a_call_leaves_the_results_of_the_previous_one_alone() -> None:
    """The flat buffers are reused from call to call: the histograms of one call stay as they
    were after a second call on other values of the same sizes."""
    g = torch.Generator().manual_seed(11)
    first = [torch.randn(300, generator=g), torch.randn(64, generator=g)]
    second = [torch.randn(300, generator=g) * 5, torch.randn(64, generator=g) - 3]
    hists = ops.histograms(first, bins=6)
    kept = [field.clone() for field in hists]
    again = ops.histograms(second, bins=6)
    for field, copy in zip(hists, kept, strict=True):
        assert torch.equal(field, copy)
    assert not torch.equal(again.edges, hists.edges)
    for i, t in enumerate(second):
        values = t.double().numpy()
        binned_like_numpy(again.counts[i].numpy(), values, values.min(), values.max(), 6,
                          np.float32)
