"""Seed-level aggregation and paired Wilcoxon tests over long-format benchmark records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

GROUP_KEYS: tuple[str, ...] = ("method", "n_concepts", "evaluator", "metric", "role")
FAMILY_KEYS: tuple[str, ...] = ("n_concepts", "evaluator", "metric", "role")
UNIT_KEYS: tuple[str, ...] = ("concept", "seed")

SEED_COLUMNS = [*GROUP_KEYS, "seed", "value", "n_samples"]
UNIT_COLUMNS = [*GROUP_KEYS, *UNIT_KEYS, "value", "n_samples"]
SUMMARY_COLUMNS = [*GROUP_KEYS, "mean", "std", "n_seeds", "n_samples", "higher_is_better"]
TEST_COLUMNS = [
    *FAMILY_KEYS,
    "method_a",
    "method_b",
    "n_pairs",
    "n_nonzero",
    "mean_diff",
    "statistic",
    "p_value",
    "p_holm",
    "effect_size",
    "min_p",
    "method_p",
    "warning",
]

# Thresholds of scipy.stats.wilcoxon(method="auto") as of scipy 1.17 (scipy/stats/_wilcoxon.py):
# above _AUTO_EXACT_MAX_N pairs it is always asymptotic; otherwise the exact null distribution is
# used only without zeros or ties, else an exhaustive sign-flip permutation test up to
# _AUTO_PERMUTATION_MAX_N pairs (2**13 <= 9999 resamples) and the asymptotic test beyond.
_AUTO_EXACT_MAX_N = 50
_AUTO_PERMUTATION_MAX_N = 13


def _mean_by(records: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    keys = list(keys)
    if records.empty:
        return pd.DataFrame(columns=[*keys, "value", "n_samples"])
    frame = records[keys].assign(value=records["value"].astype(float))
    grouped = frame.groupby(keys, sort=True, dropna=False)["value"]
    out = grouped.agg(value="mean", n_samples="size").reset_index()
    return out.sort_values(keys, kind="mergesort").reset_index(drop=True)


def seed_values(records: pd.DataFrame) -> pd.DataFrame:
    """Collapse each seed to one number, because seeds (not prompts) are the replicates."""
    return _mean_by(records, [*GROUP_KEYS, "seed"])


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread across seeds, so the std reflects run-to-run variability only."""
    if records.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    keys = list(GROUP_KEYS)
    out = (
        seed_values(records)
        .groupby(keys, sort=True, dropna=False)
        .agg(
            mean=("value", "mean"),
            std=("value", "std"),
            n_seeds=("seed", "size"),
            n_samples=("n_samples", "sum"),
        )
        .reset_index()
    )
    direction = records.groupby(keys, sort=True, dropna=False)["higher_is_better"]
    if (direction.nunique() > 1).any():
        raise ValueError("higher_is_better is inconsistent within a (method, metric, role) group")
    out = out.merge(direction.first().astype(bool).reset_index(), on=keys, how="left")
    return out[SUMMARY_COLUMNS].sort_values(keys, kind="mergesort").reset_index(drop=True)


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """Render a table cell; a missing std means a single seed, so no spread is claimed."""
    if mean is None or pd.isna(mean):
        return "—"
    # + 0.0 turns a rounded -0.0 (an FID of a set against itself, -1e-9) into 0.0
    shown = f"{round(mean, digits) + 0.0:.{digits}f}"
    if std is None or pd.isna(std):
        return shown
    return f"{shown} ± {std:.{digits}f}"


def paired_units(records: pd.DataFrame) -> pd.DataFrame:
    """Average prompts within (concept, seed): prompts of one concept are not independent."""
    return _mean_by(records, [*GROUP_KEYS, *UNIT_KEYS])


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjustment; NaN entries are not tests and must not inflate m."""
    p = [float(v) for v in p_values]
    order = sorted((i for i, v in enumerate(p) if not math.isnan(v)), key=lambda i: p[i])
    m = len(order)
    out = list(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def rank_biserial(differences: Sequence[float]) -> float:
    """Matched-pairs rank-biserial r: a bounded effect size that, unlike p, ignores sample size."""
    d = np.asarray(differences, dtype=float)
    d = d[(d != 0) & ~np.isnan(d)]
    if d.size == 0:
        return math.nan
    ranks = sps.rankdata(np.abs(d))
    w_plus, w_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((w_plus - w_minus) / (w_plus + w_minus))


def _auto_method(d: np.ndarray) -> str:
    """Mirror scipy's auto choice so readers know whether a p value is exact."""
    if d.size > _AUTO_EXACT_MAX_N:
        return "approx"
    nonzero = np.abs(d[d != 0])
    if nonzero.size == d.size and np.unique(nonzero).size == nonzero.size:
        return "exact"
    return "permutation" if d.size <= _AUTO_PERMUTATION_MAX_N else "approx"


def _compare(units_a: pd.DataFrame, units_b: pd.DataFrame, alpha: float) -> dict[str, Any]:
    merged = units_a.merge(
        units_b, on=list(UNIT_KEYS), how="inner", suffixes=("_a", "_b"), validate="one_to_one"
    )
    a = merged["value_a"].to_numpy(dtype=float)
    b = merged["value_b"].to_numpy(dtype=float)
    d = a - b
    n_pairs, n_nonzero = int(d.size), int(np.count_nonzero(d))
    min_p = min(1.0, 2.0 ** (1 - n_nonzero))
    row: dict[str, Any] = {
        "n_pairs": n_pairs,
        "n_nonzero": n_nonzero,
        "mean_diff": float(d.mean()) if n_pairs else math.nan,
        "statistic": math.nan,
        "p_value": math.nan,
        "effect_size": math.nan,
        "min_p": min_p,
        "method_p": "",
        "warning": "",
    }
    if n_pairs == 0:
        row["warning"] = "no paired units"
    elif n_nonzero == 0:
        row.update(p_value=1.0, warning="all paired differences are zero")
    else:
        result = sps.wilcoxon(a, b)
        row.update(
            statistic=float(result.statistic),
            p_value=float(result.pvalue),
            effect_size=rank_biserial(d),
            method_p=_auto_method(d),
        )
        if min_p >= alpha:
            row["warning"] = (
                f"{n_nonzero} of {n_pairs} pairs differ: cannot reach p<{alpha} "
                f"(smallest possible p={min_p:.4g})"
            )
    return row


def wilcoxon_tests(
    records: pd.DataFrame, reference: str = "none", alpha: float = 0.05
) -> pd.DataFrame:
    """Paired signed-rank tests per family, Holm-corrected so each family controls its FWER.

    Units are (concept, seed) means, paired by an inner join so that only units both methods
    measured are compared. Units whose value is NaN are dropped as unmeasured. A reference
    absent from a family yields no reference comparisons there. ``method_p`` is "exact",
    "permutation" (scipy's exhaustive sign-flip test, used for ties or zeros with n <= 13)
    or "approx" (normal approximation). Rows come in sorted family order; within a family the
    comparisons against the reference come first, then the other pairs alphabetically.
    """
    units = paired_units(records)
    units = units[units["value"].notna()]
    rows: list[dict[str, Any]] = []
    for family, group in units.groupby(list(FAMILY_KEYS), sort=True, dropna=False):
        by_method = {m: g[[*UNIT_KEYS, "value"]] for m, g in group.groupby("method", sort=True)}
        others = sorted(m for m in by_method if m != reference)
        pairs = [(m, reference) for m in others if reference in by_method]
        pairs += list(combinations(others, 2))
        family_rows = [
            {
                **dict(zip(FAMILY_KEYS, family, strict=True)),
                "method_a": a,
                "method_b": b,
                **_compare(by_method[a], by_method[b], alpha),
            }
            for a, b in pairs
        ]
        adjusted = holm([r["p_value"] for r in family_rows])
        for row, p_holm in zip(family_rows, adjusted, strict=True):
            row["p_holm"] = p_holm
        rows.extend(family_rows)
    if not rows:
        return pd.DataFrame(columns=TEST_COLUMNS)
    return pd.DataFrame(rows, columns=TEST_COLUMNS)
