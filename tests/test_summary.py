"""ScoreSummary: exact mergeability, accuracy, serialisation, non-finite handling."""

from __future__ import annotations

import json
import math
import pickle
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshield_ray.summary import (
    MAX_MAG,
    MIN_MAG,
    N_BINS,
    REL_ACCURACY,
    ScoreSummary,
    bin_centers,
    bin_edges,
    bin_index,
)

# negatives, zeros, tiny (incl. below MIN_MAG) and huge (incl. beyond MAX_MAG) magnitudes
_score = st.one_of(
    st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e-9, max_value=1e-9, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e-13, -1e-13, MIN_MAG, -MIN_MAG, 1e13, -1e13, MAX_MAG]),
)


def assert_same(a: ScoreSummary, b: ScoreSummary, scale: float) -> None:
    """Exact on counts/min/max/count/n_nonfinite; float sums up to rounding."""
    assert np.array_equal(a.counts, b.counts)
    assert (a.count, a.min, a.max, a.n_nonfinite) == (b.count, b.min, b.max, b.n_nonfinite)
    assert math.isclose(a.sum, b.sum, rel_tol=1e-12, abs_tol=1e-12 * scale)
    assert math.isclose(a.sumsq, b.sumsq, rel_tol=1e-12, abs_tol=1e-300)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(_score, max_size=120), data=st.data())
def test_merge_is_associative_and_order_independent(values: list[float], data: st.DataObject) -> None:
    x = np.array(values, dtype=np.float64)
    whole = ScoreSummary.from_values(x)
    scale = float(np.abs(x).sum()) + 1.0
    # random chunking, random order, random grouping (a random binary merge tree)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(x)), max_size=8)))
    parts = [ScoreSummary.from_values(c) for c in np.split(x, cuts)]
    parts = data.draw(st.permutations(parts))
    while len(parts) > 1:
        i = data.draw(st.integers(0, len(parts) - 2))
        a, b = parts.pop(i), parts.pop(i)
        parts.insert(i, b.merge(a) if data.draw(st.booleans()) else a.merge(b))
    assert_same(parts[0], whole, scale)
    assert_same(ScoreSummary.merge_all(ScoreSummary.from_values(c) for c in np.split(x, cuts)), whole, scale)
    assert int(whole.counts.sum()) == whole.count == len(x)


def test_empty_is_merge_identity_and_add_is_pure() -> None:
    s = ScoreSummary.from_values(np.array([1.0, -2.0, 0.0]))
    assert_same(s.merge(ScoreSummary.empty()), s, 1.0)
    assert_same(ScoreSummary.empty().merge(s), s, 1.0)
    assert ScoreSummary.merge_all([]).count == 0
    before = s.counts.copy()
    s.add(np.array([5.0]))
    assert np.array_equal(s.counts, before) and s.count == 3


def test_bin_layout_is_fixed_monotone_and_accurate() -> None:
    assert 9_000 <= N_BINS <= 12_000
    rng = np.random.default_rng(0)
    x = np.sort(np.concatenate([
        rng.standard_normal(20_000) * np.exp(rng.uniform(-27, 27, 20_000)),  # 1e-12 .. 1e12
        [0.0, -0.0, 5e-324, 1e-13, -1e-13, 1e13, -1e13, 1e300, -1e300],
    ]))
    idx = bin_index(x)
    assert idx.min() >= 0 and idx.max() < N_BINS
    assert np.all(np.diff(idx) >= 0), "bin index must be monotone in the value"
    lo, hi = bin_edges(idx)
    inside = np.abs(x) < MAX_MAG
    assert np.all((lo[inside] <= x[inside]) & (x[inside] <= hi[inside]))
    mag_ok = inside & (np.abs(x) >= MIN_MAG)
    rel = np.abs(bin_centers(idx[mag_ok]) / x[mag_ok] - 1)
    assert rel.max() <= REL_ACCURACY * (1 + 1e-9)
    assert np.all(np.abs(bin_centers(idx[np.abs(x) < MIN_MAG])) == 0.0)
    assert idx[-1] == N_BINS - 1 and idx[0] == 0  # +-1e300 land in the extreme bins


@pytest.mark.parametrize(("loc", "scale"), [(0.0, 1.0), (-3e-4, 1e-5), (100.0, 30.0)])
def test_quantiles_within_relative_accuracy(loc: float, scale: float) -> None:
    x = np.random.default_rng(1).normal(loc, scale, 100_000)
    s = ScoreSummary.from_values(x)
    qs = np.array([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0])
    est = s.quantile(qs)
    exact = np.quantile(x, qs, method="lower")  # the order statistic the sketch targets
    assert np.all(np.abs(est - exact) <= REL_ACCURACY * np.abs(exact) * (1 + 1e-9) + MIN_MAG)
    assert s.quantile(0.0) == x.min() and s.quantile(1.0) == x.max()
    assert s.mean == pytest.approx(x.mean(), rel=1e-9, abs=1e-12 * scale)
    assert s.std == pytest.approx(x.std(), rel=1e-6)


def test_count_below_tracks_the_empirical_cdf() -> None:
    x = np.random.default_rng(2).standard_t(3, 50_000)
    s = ScoreSummary.from_values(x)
    t = np.array([-10.0, -1.0, 0.0, 0.5, 3.0, 10.0])
    exact = (x[:, None] <= t).sum(axis=0)
    assert np.all(np.abs(s.count_below(t) - exact) <= 0.002 * len(x))
    assert s.count_below(x.max()) == len(x) and s.count_below(x.min() - 1) == 0


def test_nonfinite_values_are_counted_not_binned() -> None:
    s = ScoreSummary.from_values(np.array([1.0, np.nan, np.inf, -np.inf, 2.0]))
    assert s.n_nonfinite == 3
    assert s.count == 2 == int(s.counts.sum())
    assert (s.min, s.max, s.sum, s.sumsq) == (1.0, 2.0, 3.0, 5.0)
    only_bad = ScoreSummary.from_values(np.array([np.nan, np.inf]))
    assert only_bad.count == 0 and only_bad.n_nonfinite == 2 and not only_bad.counts.any()
    with pytest.raises(ValueError, match="no finite scores"):
        only_bad.quantile(0.5)
    assert s.merge(only_bad).n_nonfinite == 5


def test_to_dict_round_trip_is_sparse_json_and_pickle() -> None:
    x = np.random.default_rng(3).standard_t(3, 10_000) * 1e-3
    s = ScoreSummary.from_values(np.append(x, np.nan))
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert len(d["bin_index"]) == np.count_nonzero(s.counts) < N_BINS // 2
    for back in (ScoreSummary.from_dict(d), pickle.loads(pickle.dumps(s))):
        assert_same(back, s, 1.0)
        assert (back.sum, back.sumsq) == (s.sum, s.sumsq)
    empty = ScoreSummary.from_dict(json.loads(json.dumps(ScoreSummary.empty().to_dict(), allow_nan=False)))
    assert empty.count == 0 and empty.min == math.inf and empty.max == -math.inf
    with pytest.raises(ValueError, match="layout"):
        ScoreSummary.from_dict({**d, "layout": "signed-log/gamma=1.02"})


def test_add_ten_million_values_is_fast() -> None:
    x = np.random.default_rng(4).standard_normal(10_000_000)
    start = time.perf_counter()
    s = ScoreSummary.empty().add(x)
    elapsed = time.perf_counter() - start
    assert s.count == 10_000_000
    assert elapsed < 2.0, f"add(1e7) took {elapsed:.2f}s"
