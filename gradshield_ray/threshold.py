"""Threshold policies: turn the global ``ScoreSummary`` into a removal threshold.

Rows with ``score > tau`` are removed; ``tau = +inf`` keeps everything.  Every
policy is a deterministic function of ``(summary, config)`` and returns a
``ThresholdDecision`` whose ``evidence`` is plain JSON (non-finite -> ``None``).

Adaptive rule (needs no knowledge of the harmful ratio; defaults were tuned on
synthetic shapes only, see ``tests/test_threshold.py``):

0. No finite scores -> ``ValueError``.  All scores identical -> keep all.
1. Fit space.  ``z = (x - median) / s`` with ``s = 1.4826 * MAD`` (the exact
   std when the MAD is 0 at bin resolution) and ``y = asinh(z / c)``,
   ``c = transform_scale = 3``: linear within ~3 robust sd, logarithmic beyond.
   Why: on raw scores a benign heavy tail (Student-t) makes EM spend a wide
   component on the tail and hide a far harmful cluster; in ``y`` the tail is
   compressed and the cluster stands out.  The map is monotone, so ``tau``
   maps back exactly.
2. Fit ``N(mu, sigma)`` and 2-component GMMs by EM on the *binned* data (bin
   centres weighted by counts, Sheppard bin-width variance), started from
   several deterministic quantile splits (``init_quantiles``).
   ``Lambda = LL_gmm - LL_single``.
3. A GMM counts as "a harmful population exists" only if ALL hold:
   a. ``2*Lambda > chi2_3.ppf(1 - alpha)`` (significance) AND
      ``Lambda / N >= min_lambda_per_row`` (effect size: total Lambda grows
      with N, so any non-Gaussianity is "significant" at 1e7 rows);
   b. the high-mean component is a minority: ``weight <= max_weight``;
   c. Ashman's ``D = sqrt(2)|mu_h - mu_l| / sqrt(s_l^2 + s_h^2) >=
      min_separation``.  A spike-vs-tail split has two components with the
      same mean, so ``D ~ 0``;
   d. there is a real dip before the high component: the raw-unit density in
      a sigma_h-wide window at ``tau`` is ``<= max_dip_ratio`` times the
      density within +-1 sigma of the high mean, and a dip is significant in
      at least one binomial test: raw units at ``tau`` (``dip_alpha`` = 0.05),
      fit space at ``tau`` (``dip_alpha``), or fit space over the whole gap
      between the components' 2-sigma bounds when it holds ``tau``
      (``gap_alpha`` = 0.01).  Why: the GMM also fits a benign one-sided tail
      (spike + exponential / half-normal / lognormal / |t3|) as two
      "separated" components; in raw units such a tail decreases
      monotonically, so its density ratio at ``tau`` is > 1.  But a harmful
      cluster spread over decades (as FIHS dot products are) is so thin in
      raw units that 10-20 of its rows can never make the raw dip
      *significant* (the raw-only version kept every such cluster: 0 of 90
      synthetic ones found, 86 now); the fit-space gap test has that power.
   The highest-likelihood passing GMM wins, so a spike + tail + cluster corpus
   (whose best 2-GMM splits spike vs rest) still finds the cluster.
3'. With calibration canaries (``canaries: gate``) checks (a: effect size)
   and (d) are replaced by: the score separates the canaries (AUROC), the
   harmful population's mean sits at least ``canary_min_position`` of the way
   from the benign to the harmful canaries (fit space), at most
   ``canary_max_benign_above`` of the benign canaries lie above ``tau``, and
   at most ``canary_max_gap_share`` of the rows above ``tau`` lie below the
   harmful canaries' ``canary_low_quantile`` (else the cut is taking a
   benign task that sits between the bulk and the harm).
   3-component GMMs are fitted too (``canary_components = 3``; Λ against the
   best 2-GMM), and the harmful population may be the top one or the top two
   components.  Why: a heavy-tailed benign bulk takes both components of a
   2-GMM (core + tail) and leaves none to a harmful cluster a few σ out (issue
   13: Gemma realistic data, t3 / lognormal / spike + exponential bulks).
   Candidates of different K are compared by BIC.  Only with canaries: the
   shape alone cannot say which component is harm.
4. Harmful population: ``tau`` = the point between the component means where
   the harmful component(s)' posterior is 0.5 (``brentq`` in ``y``; posteriors are
   invariant under the monotone map), mapped back to raw scores.
5. Otherwise only the far tail goes: ``tau = max(median + k*1.4826*MAD,
   mean + k*std)`` with ``k = 5``.  The MAD bound alone removed ~20 % of a
   benign spike + one-sided tail; the moment bound caps removal at
   ``1/(1+k^2)`` for any distribution (Cantelli) and is ~0 for light tails.

Evidence: ``Lambda``, ``Lambda_per_row``, ``single_gaussian`` and
``components`` are in the fit space ``y`` (``evidence["transform"]``);
``mu_raw`` maps a component mean back to raw scores.  ``candidates`` lists
every EM start with its checks, ``branch``/``reason`` say what was decided.

Known limits: scores are assumed continuous (integer-valued scores show
"dips" between atoms); a harmful cluster needs a few dozen rows and must be
a minority; harmful rows that do not form their own bump are not found.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import optimize, stats

from gradshield_ray.summary import ScoreSummary

MAD_TO_SIGMA = 1.4826


class ThresholdConfig(BaseModel):
    """Which policy to apply and its knobs (defaults documented in the module)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["adaptive", "fixed", "top_fraction", "keep_all"] = "adaptive"
    tau: float | None = Field(default=None, allow_inf_nan=False, description="fixed: remove score > tau")
    fraction: float | None = Field(default=None, gt=0, lt=1, description="top_fraction: share removed")
    # adaptive knobs
    alpha: float = Field(default=1e-3, gt=0, lt=1, description="significance of the LR and dip tests")
    min_lambda_per_row: float = Field(default=0.1, ge=0, description="effect size (Lambda / N)")
    min_separation: float = Field(default=2.0, ge=0, description="Ashman's D in fit space")
    max_weight: float = Field(default=0.5, gt=0, le=1, description="max weight of the high component")
    max_dip_ratio: float = Field(default=0.6, gt=0, description="density at tau / density at high mean")
    dip_alpha: float = Field(default=0.05, gt=0, lt=1,
                             description="significance of the dip test; looser than alpha because a harmful "
                                         "cluster of ~20 rows cannot reach 1e-3 even with an empty gap")
    gap_alpha: float = Field(default=0.01, gt=0, lt=1,
                             description="significance of the dip test over the whole gap between the components")
    k: float = Field(default=5.0, gt=0, description="tail bound width when nothing harmful is found")
    transform_scale: float = Field(default=3.0, gt=0, description="c in y = asinh(z / c)")
    em_max_iter: int = Field(default=200, ge=1)
    em_tol: float = Field(default=1e-8, gt=0, description="relative log-likelihood change")
    canaries: Literal["gate", "report", "off"] = Field(
        default="gate",
        description="calibration canaries (gradshield_ray/canaries.py), scored beside the corpus: 'gate' = the "
                    "adaptive rule removes a component only when it sits with the harmful canaries, and removes "
                    "only the far tail when the score does not separate them; 'report' = their separation is "
                    "reported but the rule reads the score's shape only (the rule before issue 13); 'off' = not "
                    "scored")
    canary_min_auroc: float = Field(
        default=0.9, ge=0, le=1,
        description="with canaries: the score is informative only if it ranks the harmful canaries above the "
                    "benign ones with at least this AUROC; otherwise only the far tail is removed and report.json "
                    "says the score does not separate harm on this model")
    canary_min_position: float = Field(
        default=0.8, description="with canaries: the harmful population's mean must lie at least this far from the "
                                 "benign canaries' median towards the harmful canaries' median (fit space; 0 = at "
                                 "the benign canaries, 1 = at the harmful ones)")
    canary_max_benign_above: float = Field(
        default=0.1, ge=0, le=1, description="with canaries: at most this share of the benign canaries may lie "
                                             "above tau (a cut through benign rows is no harm boundary)")
    canary_components: Literal[2, 3] = Field(
        default=3, description="with canaries (gate): fit mixtures of up to this many components; the top one (or, "
                               "with 3, the top two) is the harm candidate. 3 lets a heavy-tailed benign bulk take "
                               "two components and a harmful cluster a few σ out its own (issue 13; chosen on the "
                               "threshold suite's dev shapes)")
    canary_low_quantile: float = Field(
        default=0.1, gt=0, lt=1, description="with canaries: where harm starts, as this quantile of the harmful "
                                            "canaries' scores")
    canary_max_gap_share: float = Field(
        default=0.5, ge=0, le=1,
        description="with canaries: at most this share of the rows above tau may lie below canary_low_quantile of "
                    "the harmful canaries (a cut that removes mostly rows where no harmful canary lies is taking a "
                    "benign task between the bulk and the harm)")
    init_quantiles: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field(
        default=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98), min_length=1,
        description="deterministic EM starts: split the data at these quantiles",
    )

    @model_validator(mode="after")
    def _policy_fields(self) -> ThresholdConfig:
        if self.policy == "fixed" and self.tau is None:
            raise ValueError("tau is required when policy='fixed'")
        if self.policy == "top_fraction" and self.fraction is None:
            raise ValueError("fraction is required when policy='top_fraction'")
        if self.tau is not None and self.policy != "fixed":
            raise ValueError(f"tau is only used by policy='fixed', not {self.policy!r}")
        if self.fraction is not None and self.policy != "top_fraction":
            raise ValueError(f"fraction is only used by policy='top_fraction', not {self.policy!r}")
        return self


@dataclass(frozen=True)
class ThresholdDecision:
    """Remove rows with score > tau (tau = +inf keeps all); evidence is JSON."""

    tau: float
    policy: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Canaries:
    """FIHS of the calibration canaries (gradshield_ray/canaries.py), scored with the corpus's θ₀ and v.

    Why: the score's shape alone cannot tell a harmful cluster from a benign minority task at the same distance;
    known-harmful and known-benign rows show where harm lies for this model and score."""

    harmful: np.ndarray
    benign: np.ndarray

    def auroc(self) -> float:
        h, b = np.asarray(self.harmful, float), np.asarray(self.benign, float)
        if len(h) == 0 or len(b) == 0:
            return math.nan
        return float(((h[:, None] > b[None, :]).sum() + 0.5 * (h[:, None] == b[None, :]).sum()) / (len(h) * len(b)))

    def evidence(self, cfg: ThresholdConfig) -> dict[str, Any]:
        a = self.auroc()
        return {"n_harmful": len(self.harmful), "n_benign": len(self.benign), "auroc": a,
                "informative": bool(a >= cfg.canary_min_auroc), "min_auroc": cfg.canary_min_auroc,
                "harmful_median": float(np.median(self.harmful)) if len(self.harmful) else None,
                "benign_median": float(np.median(self.benign)) if len(self.benign) else None}


Policy = Callable[[ScoreSummary, ThresholdConfig, "Canaries | None"], ThresholdDecision]


def decide(summary: ScoreSummary, cfg: ThresholdConfig | None = None,
           canaries: Canaries | None = None) -> ThresholdDecision:
    """Apply ``cfg.policy`` (default: adaptive) to a global score summary. With ``canaries`` the adaptive policy
    removes a high component only when it sits with the harmful canaries (module docstring, step 3'); every
    policy records the canaries' separation in its evidence."""
    cfg = cfg or ThresholdConfig()
    if summary.count == 0:
        raise ValueError(
            f"no finite scores to threshold (summary is empty; n_nonfinite={summary.n_nonfinite})"
        )
    if canaries is not None and not (np.all(np.isfinite(canaries.harmful)) and np.all(np.isfinite(canaries.benign))):
        raise ValueError("canary scores must be finite")
    if canaries is not None and (cfg.canaries != "gate" or cfg.policy != "adaptive"):
        dec = POLICIES[cfg.policy](summary, cfg, None)  # the canaries are evidence only
        dec.evidence["canaries"] = _jsonable(canaries.evidence(cfg))
        return dec
    return POLICIES[cfg.policy](summary, cfg, canaries)


def separation_verdict(evidence: dict[str, Any]) -> dict[str, Any]:
    """Does this score separate known harm from known benign rows on this model? Read from the canaries in a
    decision's evidence; printed by the CLI and the demo and written into report.json, so that a cut made
    with an uninformative score is never presented as a filter that works."""
    can = evidence.get("canaries")
    if not can:
        return {"separates": None, "why": "no canaries were scored (threshold.canaries: off)"}
    auroc = can.get("auroc")
    if can.get("informative"):
        return {"separates": True, "canary_auroc": auroc,
                "why": f"the score ranks the harmful canaries above the benign ones (AUROC {auroc:.2f})"}
    return {"separates": False, "canary_auroc": auroc,
            "why": f"the score does NOT separate the harmful canaries from the benign ones (AUROC "
                   f"{auroc if auroc is None else round(auroc, 2)}, needs ≥ {can.get('min_auroc')}): on this "
                   "model and score a high FIHS does not mean harmful; only the far tail was removed. Try another "
                   "score configuration (docs/efficacy.md) or review the data by other means"}


# ---- simple policies --------------------------------------------------------
def _decision(summary: ScoreSummary, tau: float, cfg: ThresholdConfig, canary_scores: Canaries | None = None,
              **extra: Any) -> ThresholdDecision:
    removed = 0.0 if math.isinf(tau) else summary.count - summary.count_below(tau)
    evidence = {"n_rows": summary.count, "n_nonfinite": summary.n_nonfinite,
                "expected_removed": removed, **extra, "config": cfg.model_dump(mode="json")}
    if canary_scores is not None and "canaries" not in evidence:
        evidence["canaries"] = canary_scores.evidence(cfg)
    return ThresholdDecision(tau=float(tau), policy=cfg.policy, evidence=_jsonable(evidence))


def _fixed(summary: ScoreSummary, cfg: ThresholdConfig, canaries: Canaries | None = None) -> ThresholdDecision:
    assert cfg.tau is not None
    return _decision(summary, cfg.tau, cfg, canaries)


def _top_fraction(summary: ScoreSummary, cfg: ThresholdConfig,
                  canaries: Canaries | None = None) -> ThresholdDecision:
    """tau = (1 - fraction) quantile; removal matches ``fraction`` only to bin resolution."""
    assert cfg.fraction is not None
    return _decision(summary, float(summary.quantile(1.0 - cfg.fraction)), cfg, canaries)


def _keep_all(summary: ScoreSummary, cfg: ThresholdConfig, canaries: Canaries | None = None) -> ThresholdDecision:
    return _decision(summary, math.inf, cfg, canaries)


# ---- adaptive policy --------------------------------------------------------
def _norm_logpdf(x: npt.ArrayLike, mu: npt.ArrayLike, var: npt.ArrayLike) -> np.ndarray:
    x, mu, var = np.asarray(x), np.asarray(mu), np.asarray(var)
    return np.asarray(-0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var))


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float | np.ndarray) -> np.ndarray:
    """Inverted-CDF quantile of values ``x`` with counts ``w`` (x need not be sorted)."""
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(w[order])
    return np.asarray(x[order][np.minimum(np.searchsorted(cum, np.asarray(q) * cum[-1]), len(x) - 1)])


@dataclass
class _Gmm:
    weight: np.ndarray  # (K,), sorted by mean: component -1 = the highest mean (the harm candidate)
    mu: np.ndarray
    var: np.ndarray
    ll: float
    init_q: tuple[float, ...]


def _component_logp(y: np.ndarray, bv: np.ndarray, wt: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Expected log(weight * pdf) over each bin (bin treated as uniform: -bv / 2var)."""
    return np.asarray(np.log(wt)[:, None] + _norm_logpdf(y[None, :], mu[:, None], var[:, None])
                      - bv[None, :] / (2 * var[:, None]))


def _logsumexp0(lp: np.ndarray) -> np.ndarray:
    """log(sum(exp(lp), axis=0)) for a few rows (components) over many bins; a max shift keeps it stable. The EM's
    inner loop: on (3, 2520) it takes 19 µs, against 79 µs for ``np.logaddexp.reduce`` along axis 0 and 131 µs for
    ``scipy.special.logsumexp`` (its generality costs more than the sum)."""
    m = lp.max(axis=0)
    return np.asarray(m + np.log(np.exp(lp - m).sum(axis=0)))


def _em(y: np.ndarray, w: np.ndarray, bv: np.ndarray, splits: np.ndarray, var_floor: float,
        max_iter: int, tol: float, init_q: tuple[float, ...]) -> _Gmm | None:
    """K-component EM (K = len(splits) + 1) on weighted bin centres, started from the groups that the sorted
    ``splits`` cut the data into."""
    group = np.searchsorted(np.sort(splits), y, side="left")
    k = len(splits) + 1
    if len(np.unique(group)) < k:
        return None
    total = w.sum()
    wt, mu, var = np.empty(k), np.empty(k), np.empty(k)
    for j in range(k):
        m = group == j
        wj = w[m]
        wt[j] = wj.sum() / total
        mu[j] = wj @ y[m] / wj.sum()
        var[j] = max((wj @ (y[m] - mu[j]) ** 2 + wj @ bv[m]) / wj.sum(), var_floor)
    prev = -np.inf
    for _ in range(max_iter):
        lp = _component_logp(y, bv, wt, mu, var)
        norm = _logsumexp0(lp)
        ll = float(w @ norm)
        resp = np.exp(lp - norm) * w
        nk = resp.sum(axis=1)
        if np.any(nk <= 1e-9 * total):
            return None  # a component died: no K-population fit from this start
        wt, mu = nk / total, resp @ y / nk
        var = np.maximum((resp * (y[None, :] - mu[:, None]) ** 2).sum(axis=1) / nk + resp @ bv / nk, var_floor)
        if ll - prev <= tol * abs(ll):
            break
        prev = ll
    ll = float(w @ _logsumexp0(_component_logp(y, bv, wt, mu, var)))
    order = np.argsort(mu, kind="stable")
    return _Gmm(wt[order], mu[order], var[order], ll, init_q)


def _adaptive(summary: ScoreSummary, cfg: ThresholdConfig, canaries: Canaries | None = None) -> ThresholdDecision:
    x, counts = summary.nonempty()
    w = counts.astype(np.float64)
    n = float(summary.count)
    med = float(_weighted_quantile(x, w, 0.5))
    mad = float(_weighted_quantile(np.abs(x - med), w, 0.5))
    robust_bound = med + cfg.k * MAD_TO_SIGMA * mad
    moment_bound = summary.mean + cfg.k * summary.std
    # sum of squares can overflow for |x| > ~1e154; then only the robust bound is usable
    tail_bound = max(robust_bound, moment_bound) if math.isfinite(moment_bound) else robust_bound
    base = {"robust_bound": robust_bound, "moment_bound": moment_bound, "tail_bound": tail_bound,
            "median": med, "mad": mad}
    if len(x) < 2:
        return _decision(summary, math.inf, cfg, canaries, branch="degenerate",
                         reason="all scores fall in one histogram bin: nothing to separate, keep all", **base)

    # MAD can be 0 at bin resolution (> half the rows in one bin); the std can underflow
    scale = next(v for v in (MAD_TO_SIGMA * mad, summary.std, summary.max - summary.min)
                 if v > 0 and math.isfinite(v))
    c = cfg.transform_scale

    def fwd(v: npt.ArrayLike) -> np.ndarray:
        return np.asarray(np.arcsinh((np.asarray(v) - med) / (scale * c)))

    def inv(v: npt.ArrayLike) -> np.ndarray:
        return np.asarray(med + scale * c * np.sinh(np.asarray(v)))

    lo_edge, hi_edge = summary.nonempty_edges()
    y = fwd(x)
    bv = (fwd(hi_edge) - fwd(lo_edge)) ** 2 / 12.0  # Sheppard: bin as uniform
    mu1 = float(w @ y / n)
    var1 = float((w @ (y - mu1) ** 2 + w @ bv) / n)
    if not (var1 > 0 and math.isfinite(var1)):  # e.g. |scores| far beyond the 1e12 bin range
        return _decision(summary, tail_bound, cfg, canaries, branch="no_harmful_population",
                         reason="score spread not resolvable in fit space; removing only the far tail", **base)
    ll1 = float(w @ (_norm_logpdf(y, mu1, var1) - bv / (2 * var1)))
    lr_critical = float(stats.chi2.ppf(1 - cfg.alpha, df=3) / 2)
    can = canaries.evidence(cfg) if canaries is not None else None
    if can is not None:  # the canaries' medians in fit space: where benign and harmful rows lie for this score
        y_b, y_h = float(np.median(fwd(canaries.benign))), float(np.median(fwd(canaries.harmful)))
        can.update(benign_median_fit=y_b, harmful_median_fit=y_h)

    def assess(g: _Gmm, ll_ref: float, h: int = 1) -> dict[str, Any]:
        """Checks for "the top ``h`` components are the harmful population" (h < K); ``hi``/``lo`` index the
        lowest harmful and the highest benign component."""
        lam = g.ll - ll_ref  # vs the best fit with one component fewer
        sd = np.sqrt(g.var)
        hi, lo = len(g.mu) - h, len(g.mu) - h - 1
        d = float(math.sqrt(2) * (g.mu[hi] - g.mu[lo]) / math.sqrt(g.var[hi] + g.var[lo]))

        def log_post_ratio(t: float) -> float:  # log P(harmful components|t) - log P(the others|t)
            lp = np.log(g.weight) + _norm_logpdf(t, g.mu, g.var)
            return float(np.logaddexp.reduce(lp[hi:]) - np.logaddexp.reduce(lp[:hi]))

        tau_y = dip = p_dip = math.nan
        dip_space, dip_ok = None, False
        if log_post_ratio(g.mu[lo]) < 0 < log_post_ratio(g.mu[hi]):
            tau_y = optimize.brentq(log_post_ratio, g.mu[lo], g.mu[hi], xtol=1e-12)
            # The dip: a valley before the high component, judged twice, because neither scale suffices.
            # Raw units: a benign one-sided tail (spike + exponential / half-normal / lognormal) decreases
            # there, so its raw density at tau is >= that near the high mean, whatever asinh makes of it;
            # but a harmful cluster spread over decades (FIHS dot products are) is so thin in raw units
            # that 10-20 of its rows can never show a *significant* raw dip. Fit space: such a cluster has
            # an empty valley that is significant, but asinh also gives a spike + half-normal tail one.
            # So: the raw density ratio at tau (sigma_h window) must be <= max_dip_ratio, and a dip must
            # be significant in at least one test (min p-value reported): raw units at tau (dip_alpha),
            # fit space at tau (dip_alpha), or fit space over the whole gap between the components'
            # 2-sigma bounds when it holds tau (gap_alpha; the test with power when high rows are few).
            al, ah = inv([g.mu[hi] - sd[hi], g.mu[hi] + sd[hi]])
            ca_lo, ca_hi = np.atleast_1d(summary.count_below(np.array([al, ah])))
            n_a = ca_hi - ca_lo

            def window(lo_y: float, hi_y: float, fit: bool) -> tuple[float, float]:
                """(density ratio, P(<= observed rows | equal density)) of [lo_y, hi_y] vs the high window."""
                bl, bh = inv([lo_y, hi_y])
                cb_lo, cb_hi = np.atleast_1d(summary.count_below(np.array([bl, bh])))
                n_b = cb_hi - cb_lo
                len_b, len_a = (hi_y - lo_y, 2 * sd[hi]) if fit else (bh - bl, ah - al)
                ratio = (n_b / len_b) / (n_a / len_a) if n_a > 0 else math.inf
                return ratio, float(stats.binom.cdf(round(n_b), round(n_a + n_b), len_b / (len_a + len_b)))

            narrow = (tau_y - sd[hi] / 2, tau_y + sd[hi] / 2)
            tests = {"raw": (*window(*narrow, fit=False), cfg.dip_alpha),
                     "fit": (*window(*narrow, fit=True), cfg.dip_alpha)}
            if g.mu[lo] + 2 * sd[lo] < tau_y < g.mu[hi] - 2 * sd[hi]:
                tests["fit_gap"] = (*window(g.mu[lo] + 2 * sd[lo], g.mu[hi] - 2 * sd[hi], fit=True),
                                    cfg.gap_alpha)
            dip = tests["raw"][0]
            significant = {k: r <= cfg.max_dip_ratio and p <= a for k, (r, p, a) in tests.items()}
            dip_space = next((k for k in tests if significant[k]), min(tests, key=lambda k: tests[k][1]))
            p_dip = tests[dip_space][1]
            dip_ok = dip <= cfg.max_dip_ratio and any(significant.values())
        checks = {
            "lr_significant": lam > lr_critical,
            "lambda_per_row": lam / n >= cfg.min_lambda_per_row,
            "high_is_minority": g.weight[hi:].sum() <= cfg.max_weight,
            "separated": d >= cfg.min_separation,
            "posterior_crossing": math.isfinite(tau_y),
            "dip": dip_ok,
        }
        position = None
        if can is not None:
            # 3'. with canaries the evidence beyond the shape is where the component sits: with the harmful
            # canaries (harm for this θ₀ and score), not merely far from the bulk (a benign minority task).
            # It replaces the effect-size and dip checks, which misread clear gaps with few rows (issue 13).
            span = can["harmful_median_fit"] - can["benign_median_fit"]
            # the harmful population's mean (one component, or the weighted mean of the top two)
            mu_h = float(g.weight[hi:] @ g.mu[hi:] / g.weight[hi:].sum())
            position = (mu_h - can["benign_median_fit"]) / span if span > 0 else math.nan
            del checks["lambda_per_row"], checks["dip"]
            checks["canaries_informative"] = can["informative"]
            checks["sits_with_harmful_canaries"] = bool(position >= cfg.canary_min_position)
            benign_above = (float(np.mean(fwd(canaries.benign) > tau_y)) if math.isfinite(tau_y) else 1.0)
            checks["benign_canaries_below_tau"] = benign_above <= cfg.canary_max_benign_above
            # most of what the cut removes must lie where the harmful canaries lie: a benign task between the
            # bulk and the harm (a component holding both) would put its rows below the canaries' low quantile
            gap_share = 1.0
            if math.isfinite(tau_y):
                t_raw, q_raw = float(inv(tau_y)), float(np.quantile(canaries.harmful, cfg.canary_low_quantile))
                above = n - summary.count_below(t_raw)
                in_gap = max(0.0, summary.count_below(q_raw) - summary.count_below(t_raw)) if q_raw > t_raw else 0.0
                gap_share = float(in_gap / above) if above > 0 else 1.0
            checks["removed_rows_sit_with_harmful_canaries"] = gap_share <= cfg.canary_max_gap_share
        n_params = 3 * len(g.mu) - 1
        return {
            "init_quantile": list(g.init_q), "n_components": len(g.mu), "harmful_components": h,
            "log_likelihood": g.ll,
            "bic": -2 * g.ll + n_params * math.log(n), "Lambda": lam, "Lambda_per_row": lam / n,
            "components": [{"weight": g.weight[j], "mu": g.mu[j], "sigma": sd[j], "mu_raw": float(inv(g.mu[j]))}
                           for j in range(len(g.mu))],
            "ashman_d": d, "tau_fit_space": tau_y, "tau": float(inv(tau_y)) if math.isfinite(tau_y) else None,
            "dip_ratio": dip, "dip_test": dip_space, "dip_p_value": p_dip, "canary_position": position,
            "checks": checks, "passed": all(checks.values()),
        }

    at_q = dict(zip(cfg.init_quantiles, _weighted_quantile(y, w, np.array(cfg.init_quantiles)), strict=True))

    def fit(qs: tuple[float, ...], extra: float | None = None) -> _Gmm | None:
        splits = np.array([at_q[q] for q in qs])
        if extra is not None:
            splits = np.append(splits, extra)
        return _em(y, w, bv, splits, 1e-4 * var1, cfg.em_max_iter, cfg.em_tol,
                   qs if extra is None else (*qs, math.nan))

    fits2 = [g for g in (fit((q,)) for q in cfg.init_quantiles) if g is not None]
    candidates = [assess(g, ll1) for g in fits2]
    if can is not None and can["informative"] and cfg.canary_components == 3 and fits2:
        # 3': a benign bulk with a heavy tail takes both components of a 2-GMM (bulk + tail), so a harmful
        # cluster a few σ out gets none; a third component gives it one. Only with canaries: they, not the
        # shape, say whether the top component is harm (a 3-GMM fits a second benign task just as well); not
        # when they are uninformative (no candidate can pass then).
        # Starts: every pair of quantile splits, and each quantile below the canaries' midpoint with a split
        # at that midpoint (the top component starts where the harmful canaries are).
        ll2 = max(g.ll for g in fits2)
        mid = 0.5 * (can["benign_median_fit"] + can["harmful_median_fit"])
        below = [q for q, v in at_q.items() if v < mid]
        fits3 = [fit(pair) for pair in itertools.combinations(cfg.init_quantiles, 2)]
        fits3 += [fit((q,), mid) for q in below]
        # the harmful population is the top component, or the top two when both sit with the harmful canaries
        candidates += [assess(g, ll2, h) for g in fits3 if g is not None for h in (1, 2)]
    passing = [cand for cand in candidates if cand["passed"]]
    pool = passing or candidates
    # best model first (BIC = max likelihood at one K); for one fit, the larger harmful population
    chosen = min(pool, key=lambda cand: (cand["bic"], -cand["harmful_components"])) if pool else None

    evidence: dict[str, Any] = {
        **base,
        "transform": {"median": med, "scale": scale, "c": c, "fit_space": "y = asinh((x - median) / (scale * c))"},
        "single_gaussian": {"mu": mu1, "sigma": math.sqrt(var1), "log_likelihood": ll1},
        "lr_critical": lr_critical,
        "candidates": candidates,
    }
    if can is not None:
        evidence["canaries"] = can
    if chosen is not None:
        evidence.update(Lambda=chosen["Lambda"], Lambda_per_row=chosen["Lambda_per_row"],
                        components=chosen["components"], harmful_components=chosen["harmful_components"],
                        separation={"ashman_d": chosen["ashman_d"], "dip_ratio": chosen["dip_ratio"],
                                    "dip_test": chosen["dip_test"],
                                    "dip_p_value": chosen["dip_p_value"]},
                        checks=chosen["checks"])
    if passing:
        assert chosen is not None
        return _decision(summary, chosen["tau"], cfg, None, branch="harmful_population",
                         reason="separated minority component with a dip before it: cut at posterior 0.5",
                         **evidence)
    why = ("no 2-component fit" if chosen is None else
           "failed: " + ", ".join(k for k, ok in chosen["checks"].items() if not ok))
    return _decision(summary, tail_bound, cfg, None, branch="no_harmful_population",
                     reason=f"{why}; removing only the far tail above max(robust, moment) bound", **evidence)


POLICIES: dict[str, Policy] = {
    "adaptive": _adaptive,
    "fixed": _fixed,
    "top_fraction": _top_fraction,
    "keep_all": _keep_all,
}


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy: numpy scalars -> Python, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
