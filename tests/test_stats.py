"""Hand-checked expectations for fia_bench.stats."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from fia_bench import stats

COLUMNS = [
    "method",
    "n_concepts",
    "seed",
    "concept",
    "role",
    "prompt_id",
    "evaluator",
    "metric",
    "value",
    "higher_is_better",
]


def rec(
    method,
    value,
    *,
    seed=0,
    concept="c0",
    prompt="p0",
    n=1,
    role="forget",
    evaluator="clf",
    metric="acc",
    hib=False,
):
    return {
        "method": method,
        "n_concepts": n,
        "seed": seed,
        "concept": concept,
        "role": role,
        "prompt_id": prompt,
        "evaluator": evaluator,
        "metric": metric,
        "value": value,
        "higher_is_better": hib,
    }


def frame(rows):
    return pd.DataFrame(rows, columns=COLUMNS)


def paired(values_a, values_b, method_a="a", method_b="none", **kw):
    """One unit per concept (seed 0) for two methods."""
    rows = [rec(method_a, v, concept=f"c{i}", **kw) for i, v in enumerate(values_a)]
    rows += [rec(method_b, v, concept=f"c{i}", **kw) for i, v in enumerate(values_b)]
    return frame(rows)


def only_row(df):
    assert len(df) == 1
    return df.iloc[0]


# ----------------------------------------------------------------------------- summaries
def summary_records():
    rows = [
        rec("m", 0.5, seed=0, prompt="p0"),
        rec("m", 1.5, seed=0, prompt="p1"),  # seed mean 1
        rec("m", 2.0, seed=1),  # seed mean 2
        rec("m", 3.0, seed=2, prompt="p0"),
        rec("m", 5.0, seed=2, prompt="p1"),  # seed mean 4
        rec("m", 7.0, seed=0, role="retain", hib=True),
        rec("m", 9.0, seed=0, role="retain", hib=True, prompt="p1"),
    ]
    return frame(rows).assign(extra_column="ignored")


def test_seed_values_means_rows_per_seed():
    out = stats.seed_values(summary_records())
    assert list(out.columns) == [*stats.GROUP_KEYS, "seed", "value", "n_samples"]
    target = out[out["role"] == "forget"]
    assert target["seed"].tolist() == [0, 1, 2]
    assert target["value"].tolist() == pytest.approx([1.0, 2.0, 4.0])
    assert target["n_samples"].tolist() == [2, 1, 2]


def test_summarize_mean_and_sample_std_over_seeds():
    out = stats.summarize(summary_records())
    assert list(out.columns) == [
        *stats.GROUP_KEYS,
        "mean",
        "std",
        "n_seeds",
        "n_samples",
        "higher_is_better",
    ]
    assert out["role"].tolist() == ["forget", "retain"]  # sorted by GROUP_KEYS
    target = out.iloc[0]
    # mean of seed means (1, 2, 4), not the pooled row mean 2.4
    assert target["mean"] == pytest.approx(7 / 3)
    assert target["std"] == pytest.approx(math.sqrt(21 / 9))  # 1.5275
    assert target["std"] == pytest.approx(1.5275, abs=1e-4)
    assert (target["n_seeds"], target["n_samples"]) == (3, 5)
    assert not target["higher_is_better"]
    retain = out.iloc[1]
    assert retain["mean"] == pytest.approx(8.0)
    assert math.isnan(retain["std"])
    assert (retain["n_seeds"], retain["n_samples"]) == (1, 2)
    assert retain["higher_is_better"]


def test_summarize_is_order_independent():
    records = summary_records()
    shuffled = records.sample(frac=1.0, random_state=3).reset_index(drop=True)
    pd.testing.assert_frame_equal(stats.summarize(records), stats.summarize(shuffled))


def test_summarize_rejects_inconsistent_direction():
    records = frame([rec("m", 1.0, hib=True), rec("m", 2.0, hib=False, seed=1)])
    with pytest.raises(ValueError):
        stats.summarize(records)


def test_format_mean_std():
    assert stats.format_mean_std(12.3449, 1.2) == "12.34 ± 1.20"
    assert stats.format_mean_std(12.3449, float("nan")) == "12.34"
    assert stats.format_mean_std(-1e-9, float("nan")) == "0.00"  # no "-0.00"
    assert stats.format_mean_std(-0.004, 0.001) == "0.00 ± 0.00"
    assert stats.format_mean_std(-0.006, 0.001) == "-0.01 ± 0.00"
    assert stats.format_mean_std(float("nan"), 1.0) == "—"
    assert stats.format_mean_std(0.5, 0.25, digits=3) == "0.500 ± 0.250"


def test_paired_units_average_prompts():
    records = frame(
        [rec("m", 1.0, prompt="p0"), rec("m", 4.0, prompt="p1"), rec("m", 10.0, concept="c1")]
    )
    out = stats.paired_units(records)
    assert out["concept"].tolist() == ["c0", "c1"]
    assert out["value"].tolist() == pytest.approx([2.5, 10.0])
    assert out["n_samples"].tolist() == [2, 1]


def test_empty_inputs_give_empty_frames_with_columns():
    empty = frame([])
    assert list(stats.seed_values(empty).columns) == stats.SEED_COLUMNS
    assert list(stats.paired_units(empty).columns) == stats.UNIT_COLUMNS
    assert list(stats.summarize(empty).columns) == stats.SUMMARY_COLUMNS
    assert list(stats.wilcoxon_tests(empty).columns) == stats.TEST_COLUMNS
    for fn in (stats.seed_values, stats.paired_units, stats.summarize, stats.wilcoxon_tests):
        assert fn(empty).empty


# ----------------------------------------------------------------------------- holm / effect
def test_holm_known_values_and_nan_passthrough():
    out = stats.holm([0.01, 0.04, 0.03, float("nan")])
    assert out[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(out[3])


def test_holm_is_monotone_and_capped():
    p = [0.05, 0.01, 0.04, 0.02, 0.03]
    # sorted: 5*.01=.05, 4*.02=.08, 3*.03=.09, 2*.04=.08 -> .09, 1*.05=.05 -> .09
    assert stats.holm(p) == pytest.approx([0.09, 0.05, 0.09, 0.08, 0.09])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 0.2, size=20).tolist()
    adj = stats.holm(raw)
    order = np.argsort(raw)
    assert np.all(np.diff(np.asarray(adj)[order]) >= 0)
    assert all(r <= a <= 1.0 for r, a in zip(raw, adj, strict=True))
    assert stats.holm([]) == []


def test_rank_biserial_with_ties_by_hand():
    # non-zero d = [1, -1, 2, 3]; |d| ranks = [1.5, 1.5, 3, 4] -> W+ = 8.5, W- = 1.5
    assert stats.rank_biserial([1, -1, 2, 3, 0]) == pytest.approx(0.7)
    assert stats.rank_biserial([-2, -1]) == pytest.approx(-1.0)
    assert math.isnan(stats.rank_biserial([0, 0]))


# ----------------------------------------------------------------------------- wilcoxon
def test_wilcoxon_five_positive_pairs_exact():
    row = only_row(stats.wilcoxon_tests(paired([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])))
    assert (row["method_a"], row["method_b"]) == ("a", "none")
    assert (row["n_pairs"], row["n_nonzero"]) == (5, 5)
    assert row["mean_diff"] == pytest.approx(3.0)
    assert row["statistic"] == 0.0  # scipy reports min(W+, W-)
    assert row["p_value"] == pytest.approx(0.0625)  # 2 / 2**5
    assert row["p_holm"] == pytest.approx(0.0625)
    assert row["effect_size"] == pytest.approx(1.0)
    assert row["min_p"] == pytest.approx(0.0625)
    assert row["method_p"] == "exact"
    assert row["warning"] == (
        "5 of 5 pairs differ: cannot reach p<0.05 (smallest possible p=0.0625)"
    )


@pytest.mark.parametrize(
    ("d", "method_p"),
    [
        ([0.5, -1.0, 2.0, 3.5, 4.0, -0.25, 6.0, 7.5, 8.0, 9.0], "exact"),
        ([1.0, -1.0, 2.0, 3.0, 4.0, 2.0, -5.0, 6.0, 7.0, 8.0], "permutation"),  # ties
        ([1.0, 0.0, 2.0, 3.0, 4.0, -2.5, 5.0, 6.0, 7.0, 8.0], "permutation"),  # a zero
        ([float(i) for i in range(1, 20)] + [3.0], "approx"),  # n=20 with a tie
        ([float(i) * (-1) ** (i % 3 == 0) for i in range(1, 61)], "approx"),  # n > 50
    ],
)
def test_wilcoxon_matches_scipy(d, method_p):
    b = np.linspace(10.0, 20.0, len(d))
    a = b + np.asarray(d)
    row = only_row(stats.wilcoxon_tests(paired(a.tolist(), b.tolist())))
    expected = sps.wilcoxon(a, b)
    assert row["n_pairs"] == len(d)
    assert row["n_nonzero"] == int(np.count_nonzero(a - b))
    assert row["statistic"] == pytest.approx(expected.statistic)
    assert row["p_value"] == pytest.approx(expected.pvalue)
    assert row["effect_size"] == pytest.approx(stats.rank_biserial(a - b))
    assert row["method_p"] == method_p
    assert row["warning"] == ""


def test_wilcoxon_exact_n10_by_hand():
    # all ten differences positive -> W- = 0, exact two-sided p = 2 / 2**10
    row = only_row(stats.wilcoxon_tests(paired(list(range(2, 12)), [1] * 10)))
    assert row["statistic"] == 0.0
    assert row["p_value"] == pytest.approx(2 / 1024)
    assert row["min_p"] == pytest.approx(2 / 1024)


def test_wilcoxon_all_zero_differences():
    row = only_row(stats.wilcoxon_tests(paired([1, 2, 3], [1, 2, 3])))
    assert (row["n_pairs"], row["n_nonzero"]) == (3, 0)
    assert math.isnan(row["statistic"])
    assert row["p_value"] == 1.0 and row["p_holm"] == 1.0
    assert row["mean_diff"] == 0.0
    assert row["warning"] == "all paired differences are zero"


def test_wilcoxon_no_paired_units():
    records = frame([rec("a", 1.0, concept="x"), rec("none", 1.0, concept="y")])
    row = only_row(stats.wilcoxon_tests(records))
    assert row["n_pairs"] == 0
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"])
    assert row["warning"] == "no paired units"


def test_wilcoxon_pairs_on_concept_and_seed_not_row_order():
    diffs = [1.0, 2.0, 3.0, 4.0, 5.0]
    keys = [("c0", 0), ("c1", 0), ("c0", 1), ("c1", 1), ("c2", 0)]
    rows = [rec("none", 10.0 * (i + 1), concept=c, seed=s) for i, (c, s) in enumerate(keys)]
    # method "a": reversed row order, two prompts per unit, plus units "none" lacks
    for i, (c, s) in reversed(list(enumerate(keys))):
        target = 10.0 * (i + 1) + diffs[i]
        rows += [
            rec("a", target - 1.0, concept=c, seed=s, prompt="p0"),
            rec("a", target + 1.0, concept=c, seed=s, prompt="p1"),
        ]
    rows += [rec("a", -100.0, concept="c9", seed=0), rec("a", -100.0, concept="c0", seed=7)]
    row = only_row(stats.wilcoxon_tests(frame(rows)))
    assert row["n_pairs"] == 5
    assert row["mean_diff"] == pytest.approx(3.0)
    assert row["statistic"] == 0.0
    assert row["p_value"] == pytest.approx(0.0625)
    assert row["effect_size"] == pytest.approx(1.0)


def test_wilcoxon_enumerates_pairs_per_family_with_holm():
    rows = []
    for n in (1, 2):
        for i in range(6):
            base = float(i)
            rows += [
                rec("none", base, concept=f"c{i}", n=n),
                rec("esd", base + 1 + i, concept=f"c{i}", n=n),
                rec("uce", base + 2 * (i + 1), concept=f"c{i}", n=n),
                rec("ac", base - 0.5 * (i - 2), concept=f"c{i}", n=n),
            ]
    rows += [rec(m, 1.0, role="retain") for m in ("esd", "none")]
    out = stats.wilcoxon_tests(frame(rows).sample(frac=1.0, random_state=1))
    fam = out[(out["n_concepts"] == 1) & (out["role"] == "forget")]
    assert list(zip(fam["method_a"], fam["method_b"], strict=True)) == [
        ("ac", "none"),
        ("esd", "none"),
        ("uce", "none"),
        ("ac", "esd"),
        ("ac", "uce"),
        ("esd", "uce"),
    ]
    assert fam["p_holm"].tolist() == pytest.approx(stats.holm(fam["p_value"].tolist()))
    assert len(out[out["n_concepts"] == 2]) == 6
    retain = only_row(out[out["role"] == "retain"])
    assert (retain["method_a"], retain["method_b"]) == ("esd", "none")
    assert retain["p_holm"] == 1.0  # its own family: not corrected with the target tests
    assert out["method_a"].lt(out["method_b"]).where(out["method_b"] != "none", True).all()
    assert out["n_concepts"].tolist() == sorted(out["n_concepts"].tolist())
    pd.testing.assert_frame_equal(out, stats.wilcoxon_tests(frame(rows)))  # order-independent


def test_wilcoxon_reference_name_and_alpha():
    records = paired([2, 4, 6, 8, 10, 12, 14], [1, 2, 3, 4, 5, 6, 7], method_b="base")
    row = only_row(stats.wilcoxon_tests(records, reference="base", alpha=0.01))
    assert (row["method_a"], row["method_b"]) == ("a", "base")
    assert row["min_p"] == pytest.approx(2 / 128)
    assert row["warning"] == (
        "7 of 7 pairs differ: cannot reach p<0.01 (smallest possible p=0.01562)"
    )
    assert only_row(stats.wilcoxon_tests(records, reference="base"))["warning"] == ""
