"""How often the adaptive threshold finds a small far-spread harmful cluster, and how often it fires on a small
benign corpus: the counts the README's Threshold paragraph states.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/threshold_shapes.py [--seeds 30] [--benign-seeds 50]

- Far-spread clusters: n = 200 rows, benign N(0, 1) plus k = 5%, 10% or 30% harmful rows at exp(N(ln 8000, 0.6))
  (first-token FIHS on the miniature: benign O(1), harmful 1e3-1e4 over a decade), seeds 0..29 each: 90 corpora.
  "found" = the harmful branch fires; "exact" = τ removes every harmful row and no benign one.
- Small benign corpora: the 9 heavy-tailed benign shapes below × n in (200, 1000) × seeds 1000..1049: 900
  corpora. "fires" = the harmful branch fires on a corpus with no harmful rows.
Each corpus is summarised in 4 chunks merged in reverse, as the distributed reduce does. tests/test_threshold.py
uses the same shapes (imported from here) on fewer seeds.

Result at this code (2026-11-30, 64 s on 1 thread): 86 of 90 found (26/30, 30/30, 30/30), all 86 an exact split;
3 of 900 benign corpora fire (spike+wide n=200: 2, spike+halfnormal n=200: 1). The raw-units-only dip test that
the two-scale test replaced (commit 072b0a8) gives 0 of 90 and 0 of 900; to rerun it, put that commit's parent's
threshold.py (`git show 072b0a8^:gradshield_ray/threshold.py`) into a copy of the package and run this script
against that copy.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from gradshield_ray.summary import ScoreSummary
from gradshield_ray.threshold import ThresholdConfig, ThresholdDecision, decide

Sampler = Callable[[np.random.Generator, int], np.ndarray]

HEAVY_TAILED_BENIGN: dict[str, Sampler] = {
    "t3": lambda r, n: r.standard_t(3, n),
    "t3 x1e-3": lambda r, n: 1e-3 * r.standard_t(3, n),
    "t3 x100 + 50": lambda r, n: 50 + 100 * r.standard_t(3, n),
    # narrow spike + wide component at the same centre
    "spike+wide": lambda r, n: np.where(r.random(n) < 0.2, r.normal(0, 1, n), r.normal(0, 0.1, n)),
    "spike+wide x1e-4 + 1e-3": lambda r, n: 1e-3 + 1e-4 * np.where(r.random(n) < 0.3, r.normal(0, 1, n),
                                                                     r.normal(0, 0.05, n)),
    # one-sided: spike + one-sided tail (asinh makes this look like a separate bump)
    "spike+halfnormal": lambda r, n: np.where(r.random(n) < 0.3, np.abs(r.normal(0, 1, n)), r.normal(0, 0.05, n)),
    "spike+exponential": lambda r, n: np.where(r.random(n) < 0.3, r.exponential(1, n), r.normal(0, 0.05, n)),
    "|t3|": lambda r, n: np.abs(r.standard_t(3, n)),
    "lognormal (raw dot products)": lambda r, n: r.lognormal(-2, 2, n),
}
FAR_SPREAD_WEIGHTS = (0.05, 0.10, 0.30)
SMALL_SIZES = (200, 1000)


def run(x: np.ndarray, **cfg: object) -> ThresholdDecision:
    """τ from x summarised in 4 chunks merged in reverse, as the distributed reduce would."""
    parts = [ScoreSummary.from_values(c) for c in np.array_split(x, 4)]
    return decide(ScoreSummary.merge_all(reversed(parts)), ThresholdConfig(**cfg))


def far_spread(weight: float, seed: int, n: int = 200) -> tuple[np.ndarray, int]:
    """The shape first-token FIHS gives on the miniature (docs/efficacy.md): benign scores O(1), harmful
    scores 1e3-1e4 spread over a decade; the harmful rows are the last k."""
    rng = np.random.default_rng(seed)
    k = round(n * weight)
    return np.concatenate([rng.normal(0, 1, n - k), np.exp(rng.normal(np.log(8000), 0.6, k))]), k


def fires(d: ThresholdDecision) -> bool:
    return d.evidence["branch"] == "harmful_population"


def far_spread_counts(seeds: range) -> dict[float, tuple[int, int]]:
    """weight → (found, exact) over the seeds."""
    out = {}
    for w in FAR_SPREAD_WEIGHTS:
        found = exact = 0
        for seed in seeds:
            x, k = far_spread(w, seed)
            d = run(x)
            found += fires(d)
            exact += bool(fires(d) and (x[-k:] > d.tau).all() and not (x[:-k] > d.tau).any())
        out[w] = (found, exact)
    return out


def benign_fires(seeds: range) -> dict[tuple[str, int], int]:
    """(shape, n) → corpora on which the harmful branch fired."""
    return {(name, n): sum(fires(run(sampler(np.random.default_rng(seed), n))) for seed in seeds)
            for name, sampler in HEAVY_TAILED_BENIGN.items() for n in SMALL_SIZES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=30, help="far-spread seeds per weight (0..seeds-1)")
    ap.add_argument("--benign-seeds", type=int, default=50, help="benign seeds per shape and size (from 1000)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    far = far_spread_counts(range(a.seeds))
    print("far-spread harmful cluster, n = 200 | found | exact split")
    for w, (found, exact) in far.items():
        print(f"  {w:.0%} harmful ({round(200 * w)} rows) | {found} of {a.seeds} | {exact} of {a.seeds}")
    tot = a.seeds * len(FAR_SPREAD_WEIGHTS)
    print(f"  all | {sum(f for f, _ in far.values())} of {tot} | {sum(e for _, e in far.values())} of {tot}")
    ben = benign_fires(range(1000, 1000 + a.benign_seeds))
    print("small benign corpora | fires")
    for (name, n), k in ben.items():
        if k:
            print(f"  {name}, n = {n} | {k} of {a.benign_seeds}")
    print(f"  all | {sum(ben.values())} of {a.benign_seeds * len(ben)}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
