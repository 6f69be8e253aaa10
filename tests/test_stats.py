"""Statistics over seeds (hdaf.training.stats) and their aggregation (hdaf.training.multiseed) on
fixed inputs, against values computed independently: closed forms, enumeration, textbook data."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hdaf.training.multiseed import (_compare_pairs, aggregate, parse_seeds, summary_markdown,
                                     sweep_markdown)
from hdaf.training.report import COLUMNS
from hdaf.training.stats import fmt_ci, fmt_p, paired, summarize, t_critical

# Student's sleep data (Cushny & Peebles 1905; R's `sleep`): extra hours of sleep, drug 1 and
# drug 2, same 10 patients.  R: t.test(g2, g1, paired = TRUE) gives t = 4.0621, df = 9,
# p-value = 0.002833, 95 percent CI 0.7001142 2.4598858, mean difference 1.58.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def t2_quantile(p: float) -> float:
    """Quantile of Student's t with 2 degrees of freedom (closed form)."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def t2_two_sided_p(t: float) -> float:
    """Two-sided p-value of Student's t with 2 degrees of freedom: 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def wilcoxon_exact_p(d) -> float:
    """Two-sided exact signed-rank p by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_plus = ranks[np.asarray(d) > 0].sum()
    n, total = len(d), ranks.sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=n)]
    lo = min(w_plus, total - w_plus)
    return min(1.0, 2 * sum(1 for s in sums if s <= lo) / 2 ** n)


def test_summarize_known_interval():
    s = summarize([1, 2, 3, 4, 5])
    assert s["n"] == 5 and s["mean"] == 3.0
    assert s["sd"] == pytest.approx(math.sqrt(2.5))
    assert s["sem"] == pytest.approx(math.sqrt(0.5))
    # t_{0.975, 4} = 2.776 (any t table)
    assert t_critical(5) == pytest.approx(2.776, abs=5e-4)
    half = t_critical(5) * math.sqrt(0.5)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((3 - half, 3 + half))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((1.0368, 4.9632), abs=1e-4)


def test_summarize_df2_closed_form_and_other_confidence():
    assert t_critical(3) == pytest.approx(t2_quantile(0.975))          # 4.3027
    assert t_critical(3, 0.90) == pytest.approx(t2_quantile(0.95))     # 2.9200
    s = summarize([10.0, 12.0, 14.0], confidence=0.90)
    half = t2_quantile(0.95) * 2.0 / math.sqrt(3)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((12 - half, 12 + half))
    with pytest.raises(ValueError, match="confidence"):
        t_critical(3, 1.5)


def test_summarize_small_n_and_missing_values():
    one = summarize([51.4])
    assert one["n"] == 1 and one["mean"] == 51.4
    assert all(math.isnan(one[k]) for k in ("sd", "sem", "ci_low", "ci_high"))
    none = summarize([])
    assert none["n"] == 0 and math.isnan(none["mean"])
    s = summarize([1.0, None, float("nan"), 3.0])         # None and NaN are left out
    assert s["n"] == 2 and s["mean"] == 2.0 and s["sd"] == pytest.approx(math.sqrt(2))


def test_paired_t_textbook_sleep_data():
    r = paired(SLEEP_2, SLEEP_1)
    assert r["n"] == 10 and r["mean_diff"] == pytest.approx(1.58)
    assert r["t"] == pytest.approx(4.0621, abs=1e-4)
    assert r["p_t"] == pytest.approx(0.002833, abs=1e-6)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.7001142, 2.4598858), abs=1e-6)
    assert r["n_a_better"] == 9 and r["n_ties"] == 1 and r["n_b_better"] == 0
    flipped = paired(SLEEP_1, SLEEP_2)
    assert flipped["t"] == pytest.approx(-r["t"]) and flipped["p_t"] == pytest.approx(r["p_t"])


def test_paired_df2_closed_form():
    a, b = [11.0, 12.0, 13.0], [10.0, 10.0, 10.0]       # differences 1, 2, 3
    r = paired(a, b)
    t = 2.0 / (1.0 / math.sqrt(3))                       # mean / (sd / sqrt(n)), sd = 1
    assert r["t"] == pytest.approx(t)
    assert r["p_t"] == pytest.approx(t2_two_sided_p(t))  # 0.07418
    half = t2_quantile(0.975) / math.sqrt(3)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((2 - half, 2 + half))
    assert r["diffs"] == [1.0, 2.0, 3.0]


def test_paired_wilcoxon_exact():
    r = paired([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert r["p_wilcoxon"] == pytest.approx(2 / 32)     # all 5 same sign: the smallest possible
    d = [1.0, -2.0, 3.0, 4.0, 5.0]
    r = paired(d, [0.0] * 5)
    assert r["p_wilcoxon"] == pytest.approx(wilcoxon_exact_p(d)) and r["p_wilcoxon"] == pytest.approx(6 / 32)


def test_paired_edge_cases():
    one = paired([50.0], [48.0])
    assert one["n"] == 1 and one["mean_diff"] == 2.0
    assert all(math.isnan(one[k]) for k in ("sd", "ci_low", "ci_high", "t", "p_t", "p_wilcoxon"))
    same = paired([50.0, 52.0, 49.0], [50.0, 52.0, 49.0])
    assert same["mean_diff"] == 0.0 and same["p_t"] == 1.0 and same["p_wilcoxon"] == 1.0
    assert same["n_ties"] == 3 and math.isnan(same["t"])
    const = paired([52.0, 53.0, 54.0], [50.0, 51.0, 52.0])
    assert const["mean_diff"] == 2.0 and const["sd"] == 0.0 and const["p_t"] == 0.0 and const["t"] == math.inf
    gaps = paired([1.0, None, 3.0, 4.0], [0.0, 5.0, float("nan"), 2.0])   # seeds with both values only
    assert gaps["n"] == 2 and gaps["diffs"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="one value per seed"):
        paired([1.0, 2.0], [1.0])


def test_formatting():
    assert fmt_ci(summarize([1, 2, 3, 4, 5])) == "3.0 [1.0, 5.0]"
    assert fmt_ci(summarize([51.44])) == "51.4 [n=1]"
    assert fmt_ci(paired([3.0, 5.0], [1.0, 2.0]), signed=True).startswith("+2.5 [")
    assert fmt_ci(summarize([])) == "N/A"
    assert fmt_p(0.0004) == "<0.001" and fmt_p(0.0625) == "0.0625" and fmt_p(0.138) == "0.138" and fmt_p(float("nan")) == "N/A"


def test_parse_seeds():
    assert parse_seeds("0,1,2,3,4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("0-2, 7") == [0, 1, 2, 7]
    for bad in ("", "a", "1,1", "-1", "0-x"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def _metrics(acc6: float, f1: float) -> dict:
    per = {e: {"acc2": 0.5, "f1": 0.5} for e in ("happy", "sad", "anger", "surprise", "disgust", "fear")}
    return {"acc6": acc6, "f1_6": f1, "per_emotion": per}


def test_aggregate_fixed_per_seed_results():
    # three seeds, two runs; run "a" has unimodal heads
    acc = {"a": [0.50, 0.54, 0.52], "b": [0.48, 0.50, 0.49]}
    per_seed = {s: {r: {"fused": _metrics(acc[r][i], acc[r][i] - 0.01),
                        "unimodal": {"text": _metrics(0.3, 0.3)}} for r in acc}
                for i, s in enumerate((0, 1, 2))}
    per_seed[2]["b"] = None                                  # seed 2 did not run b
    spec = [["G", [["A", "a", "fused"], ["B", "b", "fused"], ["A text", "a", "text"]]]]
    out = aggregate(per_seed, spec, [["a", "b"]])
    rows = {r["label"]: r for r in out["groups"][0]["rows"]}
    i6 = COLUMNS.index("Acc6")
    sa = rows["A"]["stats"][i6]
    assert sa["n"] == 3 and sa["mean"] == pytest.approx(52.0) and sa["sd"] == pytest.approx(2.0)
    half = t2_quantile(0.975) * 2.0 / math.sqrt(3)
    assert (sa["ci_low"], sa["ci_high"]) == pytest.approx((52 - half, 52 + half))
    assert rows["A"]["per_seed"]["1"][i6] == pytest.approx(54.0)
    assert rows["B"]["stats"][i6]["n"] == 2 and rows["B"]["seeds_run"] == [0, 1]
    assert rows["A text"]["stats"][i6]["mean"] == pytest.approx(30.0)
    assert rows["A text"]["stats"][i6]["sd"] == pytest.approx(0.0)
    cmp = out["comparisons"][0]
    assert (cmp["a_label"], cmp["b_label"]) == ("A", "B")
    c6 = cmp["stats"]["Acc6"]
    assert c6["n"] == 2 and c6["diffs"] == pytest.approx([2.0, 4.0]) and c6["mean_diff"] == pytest.approx(3.0)
    t = 3.0 / (math.sqrt(2.0) / math.sqrt(2))                # sd of (2, 4) = sqrt(2)
    assert c6["t"] == pytest.approx(t)
    # a run's fused head against its own unimodal head, paired by seed
    own = aggregate(per_seed, spec, [["a", "a", "fused", "text"]])["comparisons"][0]
    assert (own["a_label"], own["b_label"], own["head_b"]) == ("A", "A text", "text")
    assert own["stats"]["Acc6"]["diffs"] == pytest.approx([20.0, 24.0, 22.0])
    with pytest.raises(ValueError, match="head_a, head_b"):
        _compare_pairs({"compare": [["a", "b", "fused", "text", "x"]]}, {})
    md = summary_markdown(out, "T")
    assert "| A | 52.0 ± 2.0 |" in md and "| A − B | +3.0 [" in md and "2/2" in md
    sweep = {"key": "data.synthetic.speaker_offset", "seeds": [0, 1, 2], "points": [
        {"value": 0.0, "rows": {"A": {"Acc6": sa, "F1": sa}},
         "comparisons": [{"label": "A − B", "stats": cmp["stats"]}]}]}
    smd = sweep_markdown(sweep)
    assert "| `speaker_offset` | A | A − B | p (t) |" in smd and "| 0 | 52.0 [" in smd


def test_claims_table_checks_the_three_targets():
    from hdaf.training.multiseed import DEFAULT_COMPARE, claims_markdown
    fused = {"hdaf_aligned": [0.90, 0.92, 0.94, 0.91], "hdaf_unaligned": [0.89, 0.95, 0.92, 0.93],
             "hdaf_no_delta": [0.90, 0.91, 0.94, 0.90], "mult_aligned": [0.92, 0.93, 0.94, 0.93]}
    heads = {"text": [0.3] * 4, "audio": [0.85, 0.86, 0.84, 0.85], "vision": [0.88, 0.91, 0.90, 0.87]}
    per_seed = {s: {r: {"fused": _metrics(v[s], v[s]),
                        "unimodal": {h: _metrics(hv[s], hv[s]) for h, hv in heads.items()}
                        if r == "hdaf_aligned" else {}}
                    for r, v in fused.items()} for s in range(4)}
    spec = [["U", [["Text only", "hdaf_aligned", "text"], ["Acoustics only", "hdaf_aligned", "audio"],
                   ["Visuals only", "hdaf_aligned", "vision"]]],
            ["F", [["Aligned", "hdaf_aligned", "fused"], ["Unaligned", "hdaf_unaligned", "fused"],
                   ["No delta", "hdaf_no_delta", "fused"], ["MulT", "mult_aligned", "fused"]]]]
    summary = aggregate(per_seed, spec, DEFAULT_COMPARE)
    md = claims_markdown(summary)
    lines = {ln.split(" | ")[0]: ln for ln in md.splitlines()}
    # 91.75 - 93.0 = -1.25 < -1: missed
    assert "| HDAF aligned − MulT aligned | -1.2 [" in md and "≥ −1: **missed**" in lines["| HDAF aligned − MulT aligned"]
    # vision is the best head (mean 89.0); fused - vision = +2.75, per seed (2, 1, 4, 4)
    best = lines["| HDAF fused − best unimodal head (Visuals only)"]
    assert "+2.8 [" in best and "4/4" in best
    assert ("**met**" in best) == (paired(fused["hdaf_aligned"], heads["vision"])["p_t"] < 0.05)
    assert "within ±2: **met**" in lines["| HDAF unaligned − aligned"]
    assert "reported" in lines["| HDAF − HDAF with the delta term off"]
    assert "| HDAF fused − best unimodal head" in summary_markdown(summary, "T")
    # without MulT there is no claims table
    no_mult = aggregate(per_seed, spec, [p for p in DEFAULT_COMPARE if "mult_aligned" not in p])
    assert claims_markdown(no_mult) is None
