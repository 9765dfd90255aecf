"""The papers' composite scores, computed the way their tables do (methods.md §2.7, §3.7).

* FIA overall: the harmonic mean of preserve accuracy P and 100 − forget accuracy F.
* ScaPre UQ: each method's Avg Acc A (lower better) and CLIP_coco C are standardised against the
  mean and *population* std of all rows of the same table, squashed by a sigmoid and combined by a
  harmonic mean. It depends on which rows the table holds: compare UQ only within one table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def fia_overall(forget: float | np.ndarray, preserve: float | np.ndarray) -> float | np.ndarray:
    """2·P·(100 − F) / (P + 100 − F), in percent; 0 when both terms are 0."""
    kept = 100.0 - np.asarray(forget, dtype=float)
    preserve = np.asarray(preserve, dtype=float)
    total = preserve + kept
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(total > 0, 2 * preserve * kept / total, 0.0)
    return score.item() if score.ndim == 0 else score


def scapre_uq(avg_forget: pd.Series, clip: pd.Series) -> pd.Series:
    """UQ of every row (method) of one table; index as the inputs'."""
    a = (avg_forget.mean() - avg_forget) / avg_forget.std(ddof=0)
    c = (clip - clip.mean()) / clip.std(ddof=0)
    a_t, c_t = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-c))
    return 100 * 2 * a_t * c_t / (a_t + c_t)
