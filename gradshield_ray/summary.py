"""Fixed-size, mergeable summary of FIHS scores.

Why: the global threshold is decided from *all* scores (up to billions of rows),
so every worker must condense its scores into an O(bins) object that can be
merged by plain addition.  That only works if the bin edges are fixed a priori,
independent of the data, so we use DDSketch-style signed logarithmic bins:

* ``N_MAG`` magnitude bins per sign with edges ``MIN_MAG * GAMMA**j`` covering
  ``[MIN_MAG, MAX_MAG)``; any value is represented by its bin's centre with
  relative error at most ``REL_ACCURACY = (GAMMA - 1) / (GAMMA + 1)`` (~0.5 %).
* one zero bin for ``|x| < MIN_MAG`` (absolute error < ``MIN_MAG``);
* values with ``|x| >= MAX_MAG`` go into the outermost bin of their sign
  (exact ``min``/``max`` are tracked, and centres are clamped to them).

The bin index is monotone in the value: negative bins (most negative first),
the zero bin, then positive bins, so quantiles are a cumulative sum away.

Exactness of merging: ``counts``, ``count``, ``min``, ``max`` and
``n_nonfinite`` merge exactly (integer addition / min / max), so merging is
associative and commutative for them.  ``sum`` and ``sumsq`` are float64 sums
and may differ in the last bits between groupings.  ``std`` uses
``sumsq/n - mean**2`` and so loses precision only when ``|mean|/std > ~1e7``.

NaN/inf values are never binned and never influence any statistic; they are
only counted in ``n_nonfinite`` so that callers can notice them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

GAMMA: float = 1.01
REL_ACCURACY: float = (GAMMA - 1.0) / (GAMMA + 1.0)
MIN_MAG: float = 1e-12
MAX_MAG: float = 1e12
N_MAG: int = math.ceil(math.log(MAX_MAG / MIN_MAG) / math.log(GAMMA))
ZERO_INDEX: int = N_MAG
N_BINS: int = 2 * N_MAG + 1
_LOG_GAMMA: float = math.log(GAMMA)
_LOG_MIN: float = math.log(MIN_MAG)
LAYOUT: str = f"signed-log/gamma={GAMMA}/min={MIN_MAG}/max={MAX_MAG}"

# Magnitude edges and representative magnitudes (harmonic-style midpoint that
# minimises the worst relative error inside a bin, as in DDSketch).
_MAG_LO = MIN_MAG * GAMMA ** np.arange(N_MAG, dtype=np.float64)
_MAG_HI = _MAG_LO * GAMMA
_MAG_CENTER = 2.0 * _MAG_LO * _MAG_HI / (_MAG_LO + _MAG_HI)


def bin_index(values: np.ndarray) -> np.ndarray:
    """Bin index of each finite value (vectorised; monotone in the value)."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore"):
        k = np.log(np.abs(v))  # log(0) = -inf lands in the zero bin below
    k -= _LOG_MIN
    k *= 1.0 / _LOG_GAMMA
    # -1 -> zero bin (|x| < MIN_MAG); N_MAG - 1 -> overflow bin (|x| >= MAX_MAG)
    np.clip(k, -1.0, N_MAG - 1, out=k)
    np.floor(k, out=k)
    k += 1.0
    k *= np.sign(v)
    k += ZERO_INDEX
    return k.astype(np.int64)


def bin_edges(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) value edges of the given bins; the zero bin is +-MIN_MAG."""
    i = np.asarray(indices, dtype=np.int64)
    j = np.abs(i - ZERO_INDEX) - 1
    jj = np.clip(j, 0, N_MAG - 1)
    lo = np.where(i > ZERO_INDEX, _MAG_LO[jj], -_MAG_HI[jj])
    hi = np.where(i > ZERO_INDEX, _MAG_HI[jj], -_MAG_LO[jj])
    zero = i == ZERO_INDEX
    return np.where(zero, -MIN_MAG, lo), np.where(zero, MIN_MAG, hi)


def bin_centers(indices: np.ndarray | None = None) -> np.ndarray:
    """Representative value of the given bins (all bins if ``None``)."""
    i = np.arange(N_BINS) if indices is None else np.asarray(indices, dtype=np.int64)
    jj = np.clip(np.abs(i - ZERO_INDEX) - 1, 0, N_MAG - 1)
    return np.where(i == ZERO_INDEX, 0.0, np.sign(i - ZERO_INDEX) * _MAG_CENTER[jj])


@dataclass(frozen=True, eq=False)
class ScoreSummary:
    """Mergeable histogram + exact moments of finite scores (pure operations)."""

    counts: np.ndarray = field(repr=False)
    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    n_nonfinite: int = 0

    @staticmethod
    def empty() -> ScoreSummary:
        """The identity element of ``merge``."""
        return ScoreSummary(counts=np.zeros(N_BINS, dtype=np.int64))

    @staticmethod
    def from_values(values: np.ndarray) -> ScoreSummary:
        """Summary of one array of scores."""
        return ScoreSummary.empty().add(values)

    def add(self, values: np.ndarray) -> ScoreSummary:
        """Return a new summary that also contains ``values`` (any shape)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(v)
        n_bad = int(v.size - np.count_nonzero(finite))
        if n_bad:
            v = v[finite]
        if v.size == 0:
            return replace(self, counts=self.counts.copy(), n_nonfinite=self.n_nonfinite + n_bad)
        counts = self.counts + np.bincount(bin_index(v), minlength=N_BINS)
        with np.errstate(over="ignore"):  # sums become inf only for |x| > ~1e154
            total, total_sq = float(v.sum()), float(np.dot(v, v))
        return ScoreSummary(
            counts=counts,
            count=self.count + int(v.size),
            sum=self.sum + total,
            sumsq=self.sumsq + total_sq,
            min=min(self.min, float(v.min())),
            max=max(self.max, float(v.max())),
            n_nonfinite=self.n_nonfinite + n_bad,
        )

    def merge(self, other: ScoreSummary) -> ScoreSummary:
        """Pure merge; exact for counts/min/max/count, float-rounded for sums."""
        return ScoreSummary(
            counts=self.counts + other.counts,
            count=self.count + other.count,
            sum=self.sum + other.sum,
            sumsq=self.sumsq + other.sumsq,
            min=min(self.min, other.min),
            max=max(self.max, other.max),
            n_nonfinite=self.n_nonfinite + other.n_nonfinite,
        )

    @staticmethod
    def merge_all(summaries: Iterable[ScoreSummary]) -> ScoreSummary:
        """Merge any number of summaries (empty iterable -> empty summary)."""
        out = ScoreSummary.empty()
        for s in summaries:
            out = out.merge(s)
        return out

    # ---- read-only views -------------------------------------------------
    def nonempty(self) -> tuple[np.ndarray, np.ndarray]:
        """(centres, counts) of non-empty bins, centres clamped to [min, max].

        Clamping makes single-bin data (e.g. all scores equal) exact and keeps
        overflow bins at the true extremes.
        """
        idx = np.flatnonzero(self.counts)
        if idx.size == 0:
            return np.empty(0), np.empty(0, dtype=np.int64)
        return np.clip(bin_centers(idx), self.min, self.max), self.counts[idx]

    def nonempty_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) edges of the non-empty bins, clamped to [min, max]."""
        lo, hi = bin_edges(np.flatnonzero(self.counts))
        return np.clip(lo, self.min, self.max), np.clip(hi, self.min, self.max)

    def quantile(self, q: float | np.ndarray) -> float | np.ndarray:
        """Approximate quantile(s) from the bins, clamped to [min, max].

        Returns the centre of the bin holding the order statistic of rank
        ``floor(q * (count - 1))`` (numpy's ``method="lower"``), so the result
        is within ``REL_ACCURACY`` (relative) or ``MIN_MAG`` (absolute) of it;
        ``q=0`` / ``q=1`` give the exact min / max.
        """
        if self.count == 0:
            raise ValueError("quantile of an empty ScoreSummary (no finite scores)")
        qa = np.asarray(q, dtype=np.float64)
        if np.any((qa < 0) | (qa > 1)) or np.any(np.isnan(qa)):
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        cum = np.cumsum(self.counts)
        idx = np.searchsorted(cum, np.floor(qa * (self.count - 1)), side="right")
        out = np.clip(bin_centers(idx), self.min, self.max)
        out = np.where(qa == 0, self.min, np.where(qa == 1, self.max, out))  # exact extremes
        return float(out) if out.ndim == 0 else out

    def count_below(self, t: float | np.ndarray) -> float | np.ndarray:
        """Approximate number of rows <= t (linear interpolation inside bins).

        Why: expected removal counts and local densities for the threshold
        policies, without keeping the rows.
        """
        if self.count == 0:
            return np.zeros_like(t, dtype=np.float64) if np.ndim(t) else 0.0
        lo, hi = self.nonempty_edges()
        c = self.counts[np.flatnonzero(self.counts)].astype(np.float64)
        cum = np.cumsum(c)
        out = np.interp(t, np.column_stack([lo, hi]).ravel(), np.column_stack([cum - c, cum]).ravel(),
                        left=0.0, right=float(self.count))
        return float(out) if np.ndim(out) == 0 else out

    @property
    def mean(self) -> float:
        """Exact-moment mean (nan when empty)."""
        return self.sum / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation from the moments (nan when empty)."""
        if not self.count:
            return math.nan
        m = self.sum / self.count
        return math.sqrt(max(self.sumsq / self.count - m * m, 0.0))

    # ---- serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict; bins stored sparsely (most are empty)."""
        idx = np.flatnonzero(self.counts)
        return {
            "layout": LAYOUT,
            "bin_index": idx.tolist(),
            "bin_count": self.counts[idx].tolist(),
            "count": self.count,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "n_nonfinite": self.n_nonfinite,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ScoreSummary:
        """Inverse of ``to_dict``; refuses summaries built with other bin edges."""
        if d.get("layout") != LAYOUT:
            raise ValueError(f"incompatible summary layout {d.get('layout')!r}, expected {LAYOUT!r}")
        counts = np.zeros(N_BINS, dtype=np.int64)
        counts[np.asarray(d["bin_index"], dtype=np.int64)] = np.asarray(d["bin_count"], dtype=np.int64)
        return ScoreSummary(
            counts=counts,
            count=int(d["count"]),
            sum=float(d["sum"]),
            sumsq=float(d["sumsq"]),
            min=math.inf if d["min"] is None else float(d["min"]),
            max=-math.inf if d["max"] is None else float(d["max"]),
            n_nonfinite=int(d["n_nonfinite"]),
        )
