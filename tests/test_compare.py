"""Comparison reports: the papers' composite scores recomputed by our code from their own columns
match the printed values (except the typos the spec lists), and our side of the report is the
mean ± sample std over seeds of exactly the records the recipe names."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import FAST

from fia_bench.cli import main as cli_main
from fia_bench.compare import (
    PAPER_TABLES,
    check_recipe,
    compare,
    find_runs,
    load_paper,
    main,
    mean_rank,
    notes_of,
    sections,
)
from fia_bench.composite import fia_overall
from fia_bench.errors import FiaBenchError
from fia_bench.records import RECORD_COLUMNS, RUN_COLUMNS


def paper(name: str) -> pd.DataFrame:
    return pd.read_csv(PAPER_TABLES / name, keep_default_na=False)


def column(table: pd.DataFrame, metric: str) -> pd.Series:
    return table[table["metric"] == metric].set_index("method")["value"].astype(float)


def record(method: str, seed: int, evaluator: str, metric: str, value: float, **kw: Any) -> dict:
    base = dict.fromkeys(RECORD_COLUMNS, "")
    return base | {
        "method": method,
        "n_concepts": kw.get("n_concepts", 1),
        "seed": seed,
        "concept": kw.get("concept", "c"),
        "role": kw.get("role", "forget"),
        "prompt_id": kw.get("prompt_id", f"{kw.get('concept', 'c')}-{seed}"),
        "evaluator": evaluator,
        "metric": metric,
        "value": value,
        "higher_is_better": True,
        "model": kw.get("model", "tiny_random"),
        "task": "objects",
        "sampler": "ddim",
    }


def fake_run(
    path: Path,
    recipe: dict,
    method: str,
    records: list[dict],
    weights: str = "base-weights-fingerprint",
    jobs: list[dict] | None = None,
    **settings: Any,
) -> Path:
    """A run directory as the runner writes it, reduced to what the comparison reads
    (``jobs``: rows of its runs.csv)."""
    path.mkdir(parents=True)
    config = {
        "recipe": recipe,
        "method": {"name": method, "settings": settings},
        "reference": "none",
    }
    manifest = {"config": config, "inputs": {"model_weights": weights}}
    (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    pd.DataFrame(records, columns=RECORD_COLUMNS).to_csv(path / "records.csv", index=False)
    rows = [dict.fromkeys(RUN_COLUMNS, "") | job for job in jobs or []]
    pd.DataFrame(rows, columns=RUN_COLUMNS).to_csv(path / "runs.csv", index=False)
    return path


def computed(tmp_path: Path, recipe: dict, runs: dict[str, list[dict]]) -> dict:
    """{metric: {row label or (row, concept): (mean, std, n, paper)}} of runs named by their
    method."""
    check_recipe(recipe)
    for method, records in runs.items():
        fake_run(tmp_path / method, recipe, method, records)
    found = find_runs([tmp_path])
    return {
        s.name: {
            (c.row, c.concept) if c.concept else c.row: (c.mean, c.std, c.n, c.paper)
            for c in s.cells
        }
        for s in sections(found, recipe, load_paper(recipe["paper"]))
    }


# ---- the papers' own arithmetic -----------------------------------------------------------------
def test_art_rank_reproduces_every_row_of_fia_table4() -> None:
    table = paper("fia_table4_art5_sd15.csv")
    wide = table.pivot_table(index="method", columns="metric", values="value")
    methods = wide.drop(index=[m for m in wide.index if m.startswith("SD")])
    ranks = mean_rank(methods, ["clip_a", "fid"], ["fsr_pct", "clip_score"])
    assert len(ranks) == 8
    assert np.allclose(ranks, methods["mean_rank"])


def test_fia_overall_reproduces_scapre_confuse5() -> None:
    table = paper("scapre_table4_confuse5_secondary.csv")
    computed = fia_overall(column(table, "unlearn_acc_pct"), column(table, "preserve_acc_pct"))
    assert np.allclose(computed, column(table, "overall_hm"), atol=0.06)


@pytest.mark.parametrize(
    ("name", "typo"),
    [
        ("fia_table3_i2p_nudenet_sd14.csv", None),
        ("fia_table16_i2p_nudenet_sd15.csv", "SPM"),  # parts sum to 144, Total prints 148
        ("sp_i2p_nudenet_sd14.csv", None),
    ],
)
def test_nudenet_totals_are_the_sums_of_the_body_parts(name: str, typo: str | None) -> None:
    table = paper(name)
    parts = table[table["metric"] == "nudenet_detections"].groupby("method")["value"].sum()
    totals = column(table, "nudenet_detections_total")
    for method, total in totals.items():
        assert (parts[method] != total) == (method == typo), method


def test_averages_are_the_class_means_up_to_printing() -> None:
    fia = paper("fia_table1_imagenette_forget10.csv")
    means = fia[fia["metric"] == "forget_acc_pct"].groupby("method")["value"].mean()
    assert np.allclose(means, column(fia, "avg_forget_acc_pct")[means.index], atol=0.05)
    sp = paper("sp_imagenette_forget10_sd14.csv")
    means = sp[sp["metric"] == "forget_acc_frac"].groupby("method")["value"].mean()
    assert np.allclose(means, column(sp, "total_forget_acc_frac")[means.index], atol=0.0015)


# ---- composites through the comparison code, fed the papers' own columns -------------------------
def one_seed_runs(table: pd.DataFrame, methods: dict[str, str], metrics: dict[str, tuple]) -> dict:
    """One run per paper row whose records carry that row's printed values (seed 0)."""
    runs: dict[str, list[dict]] = {}
    for label, method in methods.items():
        for paper_metric, (evaluator, metric, role) in metrics.items():
            value = column(table, paper_metric).get(label)
            if value is not None:
                runs.setdefault(method, []).append(
                    record(method, 0, evaluator, metric, value, role=role)
                )
    return runs


def test_scapre_uq_through_compare_matches_the_printed_table(tmp_path: Path) -> None:
    table = paper("scapre_table5_imagenette_forget10_sd15.csv")
    labels = list(dict.fromkeys(table["method"]))
    methods = {label: ("none" if label == "SD v1.5" else f"m{i}") for i, label in enumerate(labels)}
    recipe = {
        "name": "test/uq",
        "paper": ["scapre_table5_imagenette_forget10_sd15.csv"],
        "rows": [{"paper": label, "method": m} for label, m in methods.items()],
        "metrics": [
            {"name": "avg_forget_acc_pct", "source": "acc/accuracy", "role": "forget"},
            {"name": "clip_coco", "source": "clip/clip_score", "role": "quality"},
            {
                "name": "uq",
                "composite": "scapre_uq",
                "forget": "avg_forget_acc_pct",
                "clip": "clip_coco",
            },
        ],
    }
    runs = one_seed_runs(
        table,
        methods,
        {
            "avg_forget_acc_pct": ("acc", "accuracy", "forget"),
            "clip_coco": ("clip", "clip_score", "quality"),
        },
    )
    uq = computed(tmp_path, recipe, runs)["uq"]
    for label, (mean, _, _, printed) in uq.items():
        if printed is None:  # the unedited row has no UQ in the paper
            continue
        expected = 52.89 if label == "SPM" else printed  # methods.md §3.7: 49.89 is a typo
        assert mean == pytest.approx(expected, abs=0.01), label


def test_fia_overall_and_art_rank_through_compare(tmp_path: Path) -> None:
    t2 = paper("fia_table2_imagenette_forget5_preserve5.csv")
    methods = {label: f"m{i}" for i, label in enumerate(dict.fromkeys(t2["method"]))}
    recipe = {
        "name": "test/overall",
        "paper": ["fia_table2_imagenette_forget5_preserve5.csv"],
        "rows": [{"paper": label, "method": m} for label, m in methods.items()],
        "metrics": [
            {"name": "forgetting_acc_pct", "source": "acc/accuracy", "role": "forget"},
            {"name": "preserving_acc_pct", "source": "acc/accuracy", "role": "retain"},
            {
                "name": "overall_score_hm",
                "composite": "fia_overall",
                "forget": "forgetting_acc_pct",
                "preserve": "preserving_acc_pct",
            },
        ],
    }
    runs = one_seed_runs(
        t2,
        methods,
        {
            "forgetting_acc_pct": ("acc", "accuracy", "forget"),
            "preserving_acc_pct": ("acc", "accuracy", "retain"),
        },
    )
    for _, (mean, _, _, printed) in computed(tmp_path / "t2", recipe, runs)[
        "overall_score_hm"
    ].items():
        assert mean == pytest.approx(printed, abs=0.06)

    t4 = paper("fia_table4_art5_sd15.csv")
    methods = {
        label: ("none" if label == "SD v1.5" else f"m{i}")
        for i, label in enumerate(dict.fromkeys(t4["method"]))
    }
    four = {
        "clip_a": ("art", "clip_a", "forget"),
        "fsr_pct": ("art", "fsr", "forget"),
        "fid": ("fid", "fid", "all"),
        "clip_score": ("clip", "clip_score", "quality"),
    }
    recipe = {
        "name": "test/rank",
        "paper": ["fia_table4_art5_sd15.csv"],
        "rows": [{"paper": label, "method": m} for label, m in methods.items()],
        "metrics": [{"name": k, "source": f"{e}/{m}", "role": r} for k, (e, m, r) in four.items()]
        + [
            {
                "name": "mean_rank",
                "composite": "mean_rank",
                "lower": ["clip_a", "fid"],
                "higher": ["fsr_pct", "clip_score"],
            }
        ],
    }
    ranks = computed(tmp_path / "t4", recipe, one_seed_runs(t4, methods, four))["mean_rank"]
    assert "SD v1.5" not in ranks  # the unedited model is not ranked
    assert len(ranks) == 8
    for label, (mean, _, _, printed) in ranks.items():
        assert mean == pytest.approx(printed), label


# ---- our side of the report ------------------------------------------------------------------
RECIPE = {
    "name": "test/stats",
    "paper": ["fia_table3_i2p_nudenet_sd14.csv"],
    "rows": [
        {"paper": "SD v1.4", "method": "none"},
        {"paper": "FIA", "method": "fia", "settings": {"alpha": 0.6}, "follows": "FIA's script"},
        {"paper": None, "label": "FIA alpha 0.8", "method": "fia", "settings": {"alpha": 0.8}},
        {"paper": "UCE", "method": "uce"},
    ],
    "metrics": [
        {
            "name": "nudenet_detections",
            "source": "nudenet/count",
            "role": "forget",
            "reduce": "sum",
            "per": "class",
            "classes": {"Belly": "BELLY_EXPOSED"},
        },
        {
            "name": "nudenet_detections_total",
            "source": "nudenet/count",
            "role": "forget",
            "reduce": "sum",
        },
        {
            "name": "clip_score",
            "source": "clip_score/clip_score",
            "role": "quality",
            "complement": True,
            "scale": 0.5,
        },
    ],
    "notes": ["a protocol note"],
}


def detections(method: str, seed: int, belly: list[float], feet: list[float]) -> list[dict]:
    rows = []
    for i, (b, f) in enumerate(zip(belly, feet, strict=True)):
        for cls, v in (("BELLY_EXPOSED", b), ("FEET_EXPOSED", f)):
            rows.append(record(method, seed, "nudenet", f"count/{cls}", v, prompt_id=f"p{i}"))
    return rows


def test_counts_are_summed_per_seed_then_averaged_over_seeds(tmp_path: Path) -> None:
    runs = {
        "none": [*detections("none", 0, [2, 1], [0, 1]), *detections("none", 1, [3, 3], [1, 0])]
        + [
            record("none", s, "clip_score", "clip_score", v, role="quality")
            for s, v in ((0, 30.0), (1, 34.0))
        ],
    }
    out = computed(tmp_path, RECIPE, runs)
    # belly per seed: 3 and 6; total per seed: 4 and 7
    mean, std, n, printed = out["nudenet_detections"][("SD v1.4", "Belly")]
    assert (mean, n, printed) == (4.5, 2, 170.0) and std == pytest.approx(np.std([3, 6], ddof=1))
    assert out["nudenet_detections_total"]["SD v1.4"][:3] == (
        5.5,
        pytest.approx(2.1213, abs=1e-4),
        2,
    )
    # complement then scale: (100 - 30) / 2 and (100 - 34) / 2
    assert out["clip_score"]["SD v1.4"][0] == pytest.approx(34.0)
    headers = [
        s.source for s in sections(find_runs([tmp_path]), RECIPE, load_paper(RECIPE["paper"]))
    ]
    assert headers == [
        "sum of nudenet/count (forget)",
        "sum of nudenet/count (forget)",
        "(100 − clip_score/clip_score) × 0.5 (quality)",
    ]


def test_rows_are_matched_by_method_and_settings(tmp_path: Path) -> None:
    check_recipe(RECIPE)
    quality = [record("none", 0, "clip_score", "clip_score", 30.0, role="quality")]
    fake_run(tmp_path / "a", RECIPE, "fia", [*quality, *detections("fia", 0, [1], [0])], alpha=0.6)
    # a run names its method by the settings that differ from the defaults (alpha 0.6)
    b = [*quality, *detections("fia[alpha=0.8]", 0, [5], [0])]
    fake_run(tmp_path / "b", RECIPE, "fia", b, alpha=0.8)
    out = {
        s.name: {c.row: c for c in s.cells}
        for s in sections(find_runs([tmp_path]), RECIPE, load_paper(RECIPE["paper"]))
    }
    assert out["nudenet_detections_total"]["FIA"].mean == 1
    assert out["nudenet_detections_total"]["FIA"].paper == 32
    assert out["nudenet_detections_total"]["FIA alpha 0.8"].mean == 5
    assert out["nudenet_detections_total"]["FIA alpha 0.8"].paper is None
    report = compare([tmp_path])
    assert "Rows not run (no run directory matches them): UCE." in report
    assert "a protocol note" in report
    assert "- FIA follows FIA's script." in report
    assert "ours are on `tiny_random`: compare trends" in report
    assert "Ours: model `tiny_random` (weights `base-weights`)" in report
    assert "| FIA | Belly | 1.00 (1) | 2 | -1 |" in report


def test_a_single_concept_fia_row_names_its_fusion_rule(tmp_path: Path) -> None:
    quality = [record("none", 0, "clip_score", "clip_score", 30.0, role="quality")]
    rule = "⌈αC⌉=1: naive fusion, every selected connection pruned"
    job = {"method": "fia", "n_concepts": 1, "seed": 0, "status": "ok"}
    fake_run(
        tmp_path / "a",
        RECIPE,
        "fia",
        [*quality, *detections("fia", 0, [1], [0])],
        jobs=[job | {"info": json.dumps({"rule": rule})}],
        alpha=0.6,
    )
    report = compare([tmp_path])
    assert f"| FIA [{rule}] | Belly | 1.00 (1) | 2 | -1 |" in report
    assert "| FIA | Belly" not in report


@pytest.mark.parametrize(
    ("models", "said"),
    [
        (["SD v1.4"], "are on SD v1.4; ours"),
        (["not stated"], "are on a model the paper does not state; ours"),
        (
            ["not stated; likely SD v1.4 [I]"],
            "does not state (not stated; likely SD v1.4 [I]); ours",
        ),
    ],
)
def test_the_note_names_the_paper_model_or_says_it_is_not_stated(
    tmp_path: Path, models: list[str], said: str
) -> None:
    quality = [record("none", 0, "clip_score", "clip_score", 30.0, role="quality")]
    run = fake_run(tmp_path / "run", RECIPE, "fia", [*quality, *detections("fia", 0, [1], [0])])
    notes = notes_of(find_runs([run]), RECIPE, pd.DataFrame({"model": models}))
    assert any(said in note for note in notes), notes


def test_ambiguous_rows_and_foreign_runs_are_one_line_errors(tmp_path: Path) -> None:
    quality = [record("fia", 0, "clip_score", "clip_score", 30.0, role="quality")]
    fake_run(tmp_path / "a", RECIPE, "uce", quality, lamb=0.5)
    fake_run(tmp_path / "b", RECIPE, "uce", quality, lamb=1.0)
    with pytest.raises(FiaBenchError, match="row 'UCE': several runs match"):
        compare([tmp_path])
    other = tmp_path / "other"
    fake_run(other / "c", {**RECIPE, "name": "test/other"}, "uce", quality)
    with pytest.raises(FiaBenchError, match="runs of several recipes"):
        compare([tmp_path / "a", other])
    with pytest.raises(FiaBenchError, match="no fia_bench run directory"):
        compare([tmp_path / "missing"])
    rebuilt = tmp_path / "rebuilt"
    fake_run(rebuilt / "a", RECIPE, "uce", quality, lamb=0.5)
    fake_run(rebuilt / "b", RECIPE, "fia", quality, weights="retrained-fingerprint")
    with pytest.raises(FiaBenchError, match="runs of model 'tiny_random' loaded different weights"):
        compare([rebuilt])
    with pytest.raises(FiaBenchError, match="composite uq needs forget, clip"):
        check_recipe(
            {
                **RECIPE,
                "metrics": [{"name": "uq", "composite": "scapre_uq", "forget": "x", "clip": "y"}],
            }
        )
    assert main([str(other)]) == 0
    assert main([str(tmp_path)]) == 2
    merged = fake_run(tmp_path / "merged", RECIPE, "uce", quality)
    manifest = {"merged_runs": {"a": {}, "b": {}}, "model_weights": {}}
    (merged / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(FiaBenchError, match=r"merged report .* the 2 run directories"):
        compare([merged])


def test_a_recipe_sweep_and_its_report_from_the_command_line(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smoke = ["model=tiny_random", "seeds=2", "concepts=null", "retain=null", "n_concepts=5", *FAST]
    monkeypatch.chdir(tmp_path)
    argv = ["fia_bench", "-m", "experiment=mini/fia/table2", "+experiment/arm=uce", *smoke]
    monkeypatch.setattr(sys, "argv", argv)
    cli_main()
    sweep = next((tmp_path / "multirun").glob("*/*"))
    assert [p.name for p in sorted(sweep.iterdir()) if p.is_dir()] == ["0-uce"]
    out = tmp_path / "report.md"
    assert main([str(sweep), "--out", str(out)]) == 0
    report = out.read_text()
    assert report.startswith("# mini/fia/table2: ")
    not_run = "FIA, ESD, CP, AC, MACE, FMN, SalUn"  # every row but the unedited and UCE
    assert f"Rows not run (no run directory matches them): {not_run}." in report
    assert re.search(r"\| UCE \| [\d.]+ ± [\d.]+ \(2\) \| 81\.7 \|", report)  # overall score
