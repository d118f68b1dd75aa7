"""The statistics the rules use, on per-window values (pure functions: the rules recompute them from the stored
windows, so that a restart or a second process sees exactly what the first saw).

- `zscore`: a window's value against its trailing baseline. Counts (volume, negatives) by their exact tail
  probability under a Poisson (or negative binomial) with the baseline's mean and variance, as a standard normal
  quantile (`count_z`): calibrated at the small counts an entity has per window. The share of negatives uses the
  binomial standard error of the pooled baseline share at the window's volume. The mean score uses the baseline's
  deviation, floored at 0.05.
- `page_hinkley`: the Page-Hinkley test for an increase of the mean (Page 1954; Hinkley 1971).
- `adwin`: ADWIN's cut test (Bifet & Gavaldà 2007) over the documents of the windows: is there a window boundary
  where the two sides' means differ by more than the Hoeffding-style bound at confidence `delta`?
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    start: int
    volume: int
    negatives: int
    score_sum: float

    def value(self, metric: str) -> float:
        if metric == "volume":
            return float(self.volume)
        if metric == "negatives":
            return float(self.negatives)
        if metric == "share_negative":
            return self.negatives / self.volume if self.volume else 0.0
        return self.score_sum / self.volume if self.volume else 0.0  # mean_score


def zscore(current: Window, baseline: list[Window], metric: str) -> float | None:
    """`current`'s z-score on `metric` against `baseline` (every trailing window, empty ones included); None when
    the baseline cannot say (no documents in it, or the window empty for a share or mean)."""
    if not baseline:
        return None
    if metric in ("volume", "negatives"):
        return count_z(current.value(metric), [w.value(metric) for w in baseline])
    volume = sum(w.volume for w in baseline)
    if volume == 0 or current.volume == 0:
        return None
    if metric == "share_negative":
        p0 = sum(w.negatives for w in baseline) / volume
        p0 = min(max(p0, 0.5 / volume), 1 - 0.5 / volume)  # never a zero error from an all-or-nothing baseline
        return (current.value(metric) - p0) / math.sqrt(p0 * (1 - p0) / current.volume)
    means = [w.value(metric) for w in baseline if w.volume]
    mean = sum(w.score_sum for w in baseline) / volume
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / max(1, len(means) - 1)) if len(means) > 1 else 0.0
    return (current.value(metric) - mean) / max(sd, 0.05)


MIN_RATE = 0.25  # counts per window assumed at least: an entity unseen in the baseline is not infinitely rare
MAX_Z = 40.0


def count_z(x: float, baseline: list[float]) -> float:
    """The z-score of a count `x` by its exact upper tail: P(X >= x) under a Poisson with the baseline's mean, or a
    negative binomial with its mean and variance when the counts vary more than a Poisson's (the variance also
    holds the uncertainty of the mean, mean / n), turned into the standard normal quantile with the same tail.
    Below the mean it is the plain (x - mean) / sd. At small counts this is calibrated where (x - mean) / sd is not:
    6 against a mean of 1.4 is z 2.5 (tail 0.006), not 3.9."""
    from scipy.stats import nbinom, norm, poisson  # scipy: only when a count rule runs

    n = len(baseline)
    mean = max(sum(baseline) / n, MIN_RATE)
    var = max(sum((v - mean) ** 2 for v in baseline) / max(1, n - 1), mean) + mean / n
    if x <= mean:
        return (x - mean) / math.sqrt(var)
    k = math.ceil(x) - 1  # P(X >= x) = sf(ceil(x) - 1)
    tail = poisson.sf(k, mean) if var <= mean * 1.0001 else nbinom.sf(k, mean * mean / (var - mean), mean / var)
    return MAX_Z if tail <= 0 else float(min(MAX_Z, norm.isf(tail)))


def page_hinkley(values: list[float], delta: float) -> float:
    """The Page-Hinkley statistic for an increase at the end of `values`: m_t - min(m) with m_t = sum of
    (x_i - mean of x_1..x_i - delta). An alarm is this over a threshold (lambda)."""
    total = cum = low = 0.0
    for i, x in enumerate(values, start=1):
        total += x
        cum += x - total / i - delta
        low = min(low, cum)
    return cum - low


def adwin_cut(windows: list[Window], metric: str, delta: float, min_side: int = 30) -> tuple[int, float] | None:
    """ADWIN's test over the documents of `windows`, split only at window boundaries: each document is one
    observation in [0, 1] (negative or not; or its score mapped from [-1, 1]). -> (index of the first newer window,
    newer mean - older mean) for the split with the largest difference over its bound
    eps = sqrt(ln(4n/delta) / (2m)), m the harmonic mean of the two sides' document counts; or None. A side needs
    `min_side` documents."""
    def mass(w: Window) -> float:
        return float(w.negatives) if metric == "share_negative" else (w.score_sum + w.volume) / 2

    n = sum(w.volume for w in windows)
    total = sum(mass(w) for w in windows)
    best, n0, s0 = None, 0, 0.0
    for cut in range(1, len(windows)):
        n0, s0 = n0 + windows[cut - 1].volume, s0 + mass(windows[cut - 1])
        n1 = n - n0
        if n0 < min_side or n1 < min_side:
            continue
        diff = (total - s0) / n1 - s0 / n0
        eps = math.sqrt(math.log(4 * n / delta) / (2 / (1 / n0 + 1 / n1)))
        if abs(diff) > eps and (best is None or abs(diff) > abs(best[1])):
            best = (cut, diff)
    return best
