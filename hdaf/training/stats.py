"""Statistics over seeds: mean, standard deviation, Student-t confidence interval, paired tests.

Every quantity is computed over *n independent replicates* (seeds) of one experiment, each
replicate giving one number per metric (for example Acc6 on the test split).

* ``summarize(values)``: ``mean``, ``sd`` (sample standard deviation, ``ddof=1``), ``sem =
  sd / sqrt(n)`` and the two-sided ``confidence`` interval ``mean ± t_{(1+c)/2, n-1} · sem``
  (Student t with ``n - 1`` degrees of freedom, ``scipy.stats.t.ppf``).
* ``paired(a, b)``: the same summary of the differences ``d = a - b`` of the two models on the
  same seeds (same data, same splits), the paired t-test (``scipy.stats.ttest_rel``, two-sided)
  and, as a check that does not assume normal differences, the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, two-sided; exact for small ``n``).  With 5 seeds the smallest
  two-sided Wilcoxon p-value is ``2 / 2**5 = 0.0625``: it can never reach 0.05.

Edge cases (all documented behaviour, tested in ``tests/test_stats.py``):

* ``None`` and NaN values are left out; ``n`` counts the values used (for ``paired``, the seeds
  where both values exist).
* ``n = 0``: everything NaN.  ``n = 1``: the mean is the value; ``sd``, ``sem``, the interval,
  the test statistics and p-values are NaN (no spread can be estimated from one replicate).
* Differences with zero spread (``n >= 2``): all zero gives ``t = NaN`` and both p-values 1.0
  (no evidence of a difference); a nonzero constant gives ``t = ±inf``, ``p_t = 0.0`` and the
  Wilcoxon p-value of ``n`` same-signed differences.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

NAN = float("nan")


def _clean(values: Iterable[Optional[float]]) -> np.ndarray:
    out = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return np.asarray(out, dtype=np.float64)


def t_critical(n: int, confidence: float = 0.95) -> float:
    """``t_{(1+confidence)/2}`` with ``n - 1`` degrees of freedom; NaN for ``n < 2``."""
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n < 2:
        return NAN
    return float(stats.t.ppf(0.5 + confidence / 2.0, n - 1))


def summarize(values: Iterable[Optional[float]], confidence: float = 0.95) -> Dict[str, object]:
    """``{"n", "mean", "sd", "sem", "ci_low", "ci_high", "confidence"}`` of ``values``."""
    x = _clean(values)
    n = int(x.size)
    out: Dict[str, object] = {"n": n, "mean": NAN, "sd": NAN, "sem": NAN, "ci_low": NAN,
                              "ci_high": NAN, "confidence": confidence}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n >= 2:
        sd = float(x.std(ddof=1))
        sem = sd / math.sqrt(n)
        half = t_critical(n, confidence) * sem
        out.update(sd=sd, sem=sem, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]],
           confidence: float = 0.95) -> Dict[str, object]:
    """Paired comparison of ``a`` and ``b`` (same seeds, position by position).

    Returns the summary of ``d = a - b`` (``mean_diff``, ``sd``, ``sem``, ``ci_low``,
    ``ci_high``, ``n``), ``t`` and ``p_t`` (paired t-test), ``p_wilcoxon``, ``n_a_better`` /
    ``n_b_better`` / ``n_ties`` (seeds where ``d > 0`` / ``< 0`` / ``== 0``) and ``diffs``.
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired(): a and b must have one value per seed, got {len(a)} and {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if x is not None and y is not None and not math.isnan(float(x)) and not math.isnan(float(y))]
    xa = np.asarray([p[0] for p in pairs], dtype=np.float64)
    xb = np.asarray([p[1] for p in pairs], dtype=np.float64)
    d = xa - xb
    s = summarize(d, confidence)
    out: Dict[str, object] = {"n": s["n"], "mean_diff": s["mean"], "sd": s["sd"], "sem": s["sem"],
                              "ci_low": s["ci_low"], "ci_high": s["ci_high"],
                              "confidence": confidence, "t": NAN, "p_t": NAN, "p_wilcoxon": NAN,
                              "n_a_better": int((d > 0).sum()), "n_b_better": int((d < 0).sum()),
                              "n_ties": int((d == 0).sum()), "diffs": [float(v) for v in d]}
    n = s["n"]
    if n < 2:
        return out
    if np.all(d == 0):
        out.update(p_t=1.0, p_wilcoxon=1.0)
        return out
    with warnings.catch_warnings():  # constant differences: scipy warns, the result is defined
        warnings.simplefilter("ignore", RuntimeWarning)
        tt = stats.ttest_rel(xa, xb)
        out["t"], out["p_t"] = float(tt.statistic), float(tt.pvalue)
        out["p_wilcoxon"] = float(stats.wilcoxon(d).pvalue)
    return out


def fmt_ci(s: Dict[str, object], digits: int = 1, signed: bool = False) -> str:
    """``"51.4 [49.9, 52.9]"`` (mean and interval of a ``summarize`` or ``paired`` result);
    ``"51.4 [n=1]"`` when there is no interval; ``signed``: ``"+2.1 [-0.3, +4.5]"``."""
    m = s["mean"] if "mean" in s else s["mean_diff"]
    if m is None or math.isnan(m):
        return "N/A"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    if math.isnan(s["ci_low"]):
        return f.format(m) + f" [n={s['n']}]"
    return f"{f.format(m)} [{f.format(s['ci_low'])}, {f.format(s['ci_high'])}]"


def fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "N/A"
    return "<0.001" if p < 1e-3 else f"{p:.3g}"
