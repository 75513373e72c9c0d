"""Speed statistics at the level of the independent unit: the round (one cell process).

Steps inside one process are not independent samples of a configuration's speed: most of the
variance is between processes (clocks and power state at the start, memory placement, the
first process of a run), so a test on step times calls identical code faster or slower. Here
each round contributes one number (its decode or prefill tok/s) and

  ratio        median(B) / median(A) over rounds
  ci           a seeded percentile bootstrap of that ratio, resampling rounds of A and B
               independently (scipy.stats.bootstrap), level 1 - alpha
  p_value      Welch's t test on log tok/s (a ratio is a difference of logs)
  noise        the pooled standard deviation of log tok/s across rounds (relative noise)
  mde          the minimum detectable effect: the smallest relative change a two-sided test at
               alpha detects with 80% power for that noise and these round counts
  change       faster / slower only when the interval lies beyond the noise floor on one side
               (above `factor` or below 1 / `factor`) and p < alpha; else same. Fewer than
               MIN_ROUNDS rounds on a side: `too few rounds`, with no p-value.

When A and B ran interleaved in one run (round k of A and round k of B in the same pass of the
schedule, minutes apart at most), the rounds are paired (`paired=True`) and the statistics are
taken on the per-round log ratios d_k = log B_k - log A_k instead:

  ratio        exp(mean d), the geometric mean of the per-round ratios
  ci           exp(mean d +- t * sd(d) / sqrt(n)), Student's t with n - 1 dof
  p_value      the paired t test (one-sample t on d)
  noise        sd(d): the relative noise of one round's ratio
  mde          (t_{1-alpha/2} + t_power) * sd(d) / sqrt(n), as a relative change

A drift that moves both sides of a pass alike (a host growing busier, clocks settling over a
run) cancels in d; unpaired, it widens both samples and hides a real change.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

MIN_ROUNDS = 3
POWER = 0.8
N_BOOT = 4000


def _positive(x) -> np.ndarray:
    x = np.asarray([v for v in x if v is not None], dtype=np.float64)
    return x[x > 0]


def pooled_sd(la: np.ndarray, lb: np.ndarray) -> float:
    """Pooled standard deviation of two samples (log tok/s): the relative noise of one round."""
    dof = len(la) + len(lb) - 2
    if dof <= 0:
        return float("nan")
    return math.sqrt((np.var(la, ddof=1) * (len(la) - 1) + np.var(lb, ddof=1) * (len(lb) - 1)) / dof)


def min_detectable_effect(sd: float, na: int, nb: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Smallest relative change (|B/A - 1|) detected with `power` by a two-sided test at `alpha`
    when log tok/s has standard deviation `sd` per round (t quantiles, na + nb - 2 dof)."""
    dof = na + nb - 2
    if dof <= 0 or not math.isfinite(sd):
        return float("nan")
    t = stats.t.ppf(1 - alpha / 2, dof) + stats.t.ppf(power, dof)
    return math.expm1(t * sd * math.sqrt(1 / na + 1 / nb))


def welch_p(la: np.ndarray, lb: np.ndarray) -> float:
    """Two-sided Welch's t p-value on log tok/s; two constant samples give 1 (equal) or 0."""
    if np.ptp(la) == 0 and np.ptp(lb) == 0:
        return 1.0 if la[0] == lb[0] else 0.0
    return float(stats.ttest_ind(lb, la, equal_var=False).pvalue)


def ratio_ci(a, b, alpha: float = 0.05, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float]:
    """Percentile bootstrap interval of median(b) / median(a), rounds resampled per side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    def ratio(x, y, axis=-1):
        return np.median(y, axis=axis) / np.median(x, axis=axis)

    res = stats.bootstrap((a, b), ratio, n_resamples=n_boot, confidence_level=1 - alpha, method="percentile",
                          vectorized=True, paired=False, rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


def paired_log_ratios(a, b) -> np.ndarray:
    """log(B_k / A_k) for the rounds k where both sides have a positive sample."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and x > 0 and y > 0]
    return np.log([y / x for x, y in pairs]) if pairs else np.zeros(0)


def paired_stats(d: np.ndarray, alpha: float = 0.05, power: float = POWER) -> dict:
    """Ratio, t interval, paired-t p-value, noise and MDE from per-round log ratios d (n >= 2)."""
    n = len(d)
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    t = stats.t.ppf(1 - alpha / 2, n - 1)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    half = t * sd / math.sqrt(n)
    return {"ratio": math.exp(mean), "ci": (math.exp(mean - half), math.exp(mean + half)), "p_value": p,
            "noise": sd, "mde": math.expm1((t + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))}


def compare_rounds(a, b, alpha: float = 0.05, factor: float = 1.02, seed: int = 0, paired: bool = False) -> dict:
    """Round samples of A and B (tok/s, higher is better) -> ratio, ci, p_value, noise, mde,
    change, n_a, n_b, method (paired | unpaired) and `why` (what kept a change from being
    called, or what was called). `paired`: a[k] and b[k] ran in the same pass of one schedule."""
    d = paired_log_ratios(a, b) if paired else None
    a, b = _positive(a), _positive(b)
    la, lb = np.log(a), np.log(b)
    na, nb = len(la), len(lb)
    out = {"n_a": na, "n_b": nb, "ratio": None, "ci": None, "p_value": None, "noise": None, "mde": None,
           "change": "n/a", "why": "", "method": "paired" if paired else "unpaired"}
    if not na or not nb:
        out["why"] = "no round samples"
        return out
    out["ratio"] = float(np.median(b) / np.median(a))
    if paired:
        out["n_a"] = out["n_b"] = na = nb = len(d)
    if na < MIN_ROUNDS or nb < MIN_ROUNDS:
        out["change"] = "too few rounds"
        out["why"] = f"{na} and {nb} rounds; a p-value and an interval need at least {MIN_ROUNDS} per side"
        return out
    if paired:
        out.update(paired_stats(d, alpha))
    else:
        out["ci"] = ratio_ci(a, b, alpha, seed)
        out["p_value"] = welch_p(la, lb)
        out["noise"] = pooled_sd(la, lb)
        out["mde"] = min_detectable_effect(out["noise"], na, nb, alpha)
    lo, hi = out["ci"]
    if lo > factor and out["p_value"] < alpha:
        out["change"], out["why"] = "faster", f"interval above {factor:g}"
    elif hi < 1 / factor and out["p_value"] < alpha:
        out["change"], out["why"] = "slower", f"interval below 1/{factor:g}"
    else:
        out["change"] = "same"
        out["why"] = (f"interval reaches within the noise floor ({1 / factor:.3f}..{factor:.3f})"
                      if out["p_value"] < alpha else f"p = {out['p_value']:.2g} >= {alpha:g}")
    return out
