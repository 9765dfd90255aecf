"""Report layouts checked against hand-computed values on synthetic records."""

from __future__ import annotations

import pandas as pd

from fia_bench.records import RECORD_COLUMNS
from fia_bench.report import concept_tables, count_tables, markdown_table


def record(
    method: str,
    seed: int,
    prompt: str,
    metric: str,
    value: float,
    concept: str = "nudity",
    role: str = "target",
) -> dict:
    return dict.fromkeys(RECORD_COLUMNS, "") | {
        "method": method,
        "n_concepts": 1,
        "seed": seed,
        "concept": concept,
        "role": role,
        "prompt_id": prompt,
        "evaluator": "detector",
        "metric": metric,
        "value": value,
        "higher_is_better": False,
    }


def test_count_table_sums_images_then_averages_seeds() -> None:
    # none: seed 0 has 2+1 BUTTOCKS, seed 1 has 0+3 -> sums 3 and 3 -> 3.00 ± 0.00
    # uce: seed 0 has 1+0, seed 1 has 0+0 -> sums 1 and 0 -> 0.50 ± 0.71
    values = {("none", 0): (2, 1), ("none", 1): (0, 3), ("uce", 0): (1, 0), ("uce", 1): (0, 0)}
    rows = [
        record(m, s, f"p{i}", "count/BUTTOCKS_EXPOSED", v)
        for (m, s), vs in values.items()
        for i, v in enumerate(vs)
    ]
    rows += [
        record(m, s, f"p{i}", "count/FEMALE_BREAST_EXPOSED", 1.0)
        for (m, s) in values
        for i in range(2)
    ]
    rows += [record(m, s, f"p{i}", "nude", 1.0) for (m, s) in values for i in range(2)]
    records = pd.DataFrame(rows, columns=RECORD_COLUMNS)

    [(title, header, table)] = count_tables(records, ["none", "uce"], {1: 2})
    assert header == ["class", "none", "uce"]
    assert "detections per class" in title
    assert table == [
        ["BUTTOCKS_EXPOSED", "3.00 ± 0.00", "0.50 ± 0.71"],
        ["FEMALE_BREAST_EXPOSED", "2.00 ± 0.00", "2.00 ± 0.00"],
        ["total", "5.00 ± 0.00", "2.50 ± 0.71"],
    ]
    # counts stay out of the per-concept layout; the image-level flag stays in it
    concept_metrics = [t[0] for t in concept_tables(records, ["none", "uce"], {1: 2})]
    assert concept_metrics == ["n_concepts=1 · detector/nude (mean ± std over seeds)"]
    assert markdown_table(header, table).count("\n") == len(table) + 1


def test_accuracy_tables_end_with_fia_overall_per_seed() -> None:
    # seed 0: forget 0, retain 100 -> H 100; seed 1: forget 50, retain 50 -> H 50
    rows = [
        record("m", 0, "t", "accuracy", 0.0, "a", "target"),
        record("m", 0, "r", "accuracy", 100.0, "b", "retain"),
        record("m", 1, "t", "accuracy", 50.0, "a", "target"),
        record("m", 1, "r", "accuracy", 50.0, "b", "retain"),
    ]
    [(_, _, table)] = concept_tables(pd.DataFrame(rows, columns=RECORD_COLUMNS), ["m"], {1: 2})
    assert table[-1] == ["**Overall (H)**", "75.00 ± 35.36"]


def test_relocated_report_links_its_figures_from_the_new_place(tmp_path) -> None:
    from fia_bench.report import FIGURES, relocated

    out = tmp_path / "docs" / "results_mini"
    text = "# report\n" + "".join(f"![{alt}]({name})\n" for name, alt in FIGURES.items())
    moved = relocated(text, out, tmp_path / "docs" / "results_mini.md")
    for name in FIGURES:
        assert f"](results_mini/{name})" in moved
    assert relocated(text, out, out / "report.md") == text
