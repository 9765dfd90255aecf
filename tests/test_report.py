"""Report layouts checked against hand-computed values on synthetic records."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from fia_bench.records import RECORD_COLUMNS, RUN_COLUMNS, rule_labels
from fia_bench.report import concept_tables, count_tables, markdown_table, summary_rows


def record(
    method: str,
    seed: int,
    prompt: str,
    metric: str,
    value: float,
    concept: str = "nudity",
    role: str = "forget",
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
        record("m", 0, "t", "accuracy", 0.0, "a", "forget"),
        record("m", 0, "r", "accuracy", 100.0, "b", "retain"),
        record("m", 1, "t", "accuracy", 50.0, "a", "forget"),
        record("m", 1, "r", "accuracy", 50.0, "b", "retain"),
    ]
    [(_, _, table)] = concept_tables(pd.DataFrame(rows, columns=RECORD_COLUMNS), ["m"], {1: 2})
    assert table[-1] == ["**Overall (H)**", "75.00 ± 35.36"]


def test_a_metric_of_concept_free_prompts_gets_no_empty_concept_table() -> None:
    rows = [
        record("m", 0, "t", "accuracy", 0.0, "a", "forget"),
        record("m", 0, "r", "accuracy", 100.0, "b", "retain"),
        record("m", 0, "c1", "clip_score", 27.0, "", "quality"),
        record("m", 0, "c2", "clip_score", 26.0, "", "quality"),
    ]
    tables = concept_tables(pd.DataFrame(rows, columns=RECORD_COLUMNS), ["m"], {1: 1})
    assert [title for title, _, _ in tables] == [
        "n_concepts=1 · detector/accuracy (mean ± std over seeds)"
    ]


def test_relocated_report_links_its_figures_from_the_new_place(tmp_path) -> None:
    from fia_bench.report import FIGURES, relocated

    out = tmp_path / "docs" / "results_mini"
    text = "# report\n" + "".join(f"![{alt}]({name})\n" for name, alt in FIGURES.items())
    moved = relocated(text, out, tmp_path / "docs" / "results_mini.md")
    for name in FIGURES:
        assert f"](results_mini/{name})" in moved
    assert relocated(text, out, out / "report.md") == text


def test_single_concept_fia_columns_name_the_fusion_rule_they_used() -> None:
    """An FIA erasure whose ⌈α·C⌉ = 1 is no plain Eq. 8 run: its column says which rule it used."""
    naive = "⌈αC⌉=1: naive fusion, every selected connection pruned"
    runs = pd.DataFrame(
        [
            dict.fromkeys(RUN_COLUMNS, "")
            | {"method": m, "n_concepts": n, "seed": s, "status": "ok", "info": json.dumps(info)}
            for m, n, s, info in [
                ("fia", 1, 0, {"rule": naive}),
                ("fia", 1, 1, {"rule": naive}),
                ("fia", 3, 0, {"rule": None}),
                ("uce", 1, 0, {}),
            ]
        ],
        columns=RUN_COLUMNS,
    )
    labels = rule_labels(runs)
    assert labels == {("fia", 1): naive}
    rows = [
        record(m, s, "p0", "nude", 1.0) | {"n_concepts": n}
        for m in ("fia", "uce")
        for n in (1, 3)
        for s in (0, 1)
    ]
    records = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    headers = {t[0]: t[1] for t in concept_tables(records, ["fia", "uce"], {1: 2, 3: 2}, labels)}
    assert headers["n_concepts=1 · detector/nude (mean ± std over seeds)"][1] == f"fia [{naive}]"
    assert headers["n_concepts=3 · detector/nude (mean ± std over seeds)"][1] == "fia"
    summary = pd.DataFrame(
        [
            {
                "method": "fia",
                "n_concepts": 1,
                "evaluator": "detector",
                "metric": "nude",
                "role": "forget",
                "mean": 1.0,
                "std": 0.0,
                "n_seeds": 2,
                "n_samples": 2,
            }
        ]
    )
    assert summary_rows(summary, labels)[1][0][0] == f"fia [{naive}]"


def job_rows(
    values: dict[tuple[str, int], tuple[float, float]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """records and runs of jobs (method, seed) → (value of prompt p0, value of prompt p1)."""
    records = pd.DataFrame(
        [
            record(m, s, f"p{i}", "accuracy", v, "tench", "forget")
            for (m, s), vs in values.items()
            for i, v in enumerate(vs)
        ],
        columns=RECORD_COLUMNS,
    )
    return records, ok_runs(values, ["p0", "p1"])


def ok_runs(jobs, prompt_ids: list[str]) -> pd.DataFrame:
    """runs.csv of successful jobs (method, seed) at n_concepts=1, each declaring
    detector/accuracy on these prompts."""
    from fia_bench.records import declared

    return pd.DataFrame(
        [
            dict.fromkeys(RUN_COLUMNS, "")
            | {
                "method": m,
                "n_concepts": 1,
                "seed": s,
                "status": "ok",
                "metrics": declared("detector/accuracy", prompt_ids),
            }
            for m, s in jobs
        ],
        columns=RUN_COLUMNS,
    )


def test_a_non_finite_score_fails_its_job_by_name_and_cells_say_their_seeds(tmp_path) -> None:
    from fia_bench.report import ImageSources, write_report

    values = {("none", s): (10.0 * s, 20.0) for s in range(3)}
    values |= {("uce", 0): (0.0, 5.0), ("uce", 1): (float("nan"), 5.0), ("uce", 2): (1.0, 7.0)}
    records, runs = job_rows(values)
    summary, tests = write_report(tmp_path, records, runs, ImageSources(), 0.05, 0)

    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    failed = pd.read_csv(tmp_path / "runs.csv").set_index(["method", "seed"])
    assert failed.loc[("uce", 1), "status"] == "failed"
    assert "non-finite score: detector/accuracy=nan (prompt p0" in failed.loc[("uce", 1), "reason"]
    assert "## Failed runs" in report and "non-finite score" in report
    # the failed seed is out of uce's mean and its cells say so; the reference keeps 3 seeds
    uce = summary[summary["method"] == "uce"].iloc[0]
    assert uce["n_seeds"] == 2 and uce["mean"] == pytest.approx((2.5 + 4.0) / 2)
    assert "| tench (forget) | 15.00 ± 5.00 | 3.25 ± 1.06 (n=2) |" in report
    # the test pairs the seeds both methods have
    assert tests.iloc[0]["n_pairs"] == 2
    # every measured value stays in records.csv, the failure's NaN included
    assert len(pd.read_csv(tmp_path / "records.csv")) == len(records)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.drop(index=1), "1 of 2 values"),
        (lambda r: r.assign(prompt_id=["p0", "p0", *r["prompt_id"][2:]]), "prompt p0 scored 2"),
        (lambda r: r.assign(prompt_id=["p0", "p7", *r["prompt_id"][2:]]), "not the declared ones"),
        (
            lambda r: pd.concat([r, r.head(1).assign(metric="other")]),
            "detector/other: values no successful job declared",
        ),
    ],
)
def test_completeness_compares_the_exact_set_of_prompts(change, message: str) -> None:
    from fia_bench.errors import FiaBenchError
    from fia_bench.records import check_complete

    records, runs = job_rows({("none", 0): (1.0, 2.0), ("none", 1): (3.0, 4.0)})
    check_complete(records, runs)
    with pytest.raises(FiaBenchError, match=message):
        check_complete(change(records).reset_index(drop=True), runs)


def test_a_method_is_named_by_the_settings_that_differ_from_its_defaults() -> None:
    import fia_bench
    from fia_bench.records import method_label
    from fia_bench.runner import default_settings, label_defaults
    from fia_bench.validate import plain

    uce = default_settings("uce", None)
    assert uce["lamb"] == 0.5
    assert method_label("uce", uce, uce) == "uce"
    assert method_label("uce", uce | {"lamb": 0.1}, uce) == "uce[lamb=0.1]"
    # in the config's order, as typed on a command line; keys the config lacks come last
    changed = uce | {"lamb": 1e-05, "erase_scale": 2.0, "guide": None, "zeta": [1, 2]}
    assert method_label("uce", changed, uce) == "uce[lamb=1e-05,erase_scale=2,zeta=[1,2]]"
    assert method_label("uce", uce | {"guide": "art"}, uce) == "uce[guide=art]"
    # a capping preset's values are the run's scale, not a chosen setting: a smoke ESD is plain
    # esd; a preset that does not declare preset_kind: caps is named by what it changes
    capped = fia_bench.compose(["method=esd", "preset=smoke"])
    smoke = plain(capped.method.settings)
    assert smoke["iterations"] == 10 and capped.preset_kind == "caps"
    assert method_label("esd", smoke, label_defaults(capped, "smoke")) == "esd"
    tuned = fia_bench.compose(["method=esd", "preset=smoke", "preset_kind=null"])
    assert method_label("esd", smoke, label_defaults(tuned, "smoke")) == (
        "esd[iterations=10,ddim_steps=10]"
    )


def write_run_dir(path, records: pd.DataFrame, runs: pd.DataFrame, steps: int = 2) -> None:
    path.mkdir()
    records.to_csv(path / "records.csv", index=False)
    runs.to_csv(path / "runs.csv", index=False)
    config = {
        "cache_dir": str(path / "cache"),
        "out_dir": str(path),
        "sampler": {"steps": steps},
        "task": {"name": "objects"},
        "model": {"world": "tiny"},
    }
    manifest = {"config": config, "inputs": {"model_weights": "ab" * 32}}
    (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def test_merging_runs_of_two_protocols_names_the_key_that_differs(tmp_path, capsys) -> None:
    from fia_bench.report import main

    records, runs = job_rows({("none", 0): (1.0, 2.0), ("none", 1): (3.0, 4.0)})
    write_run_dir(tmp_path / "a", records, runs, steps=2)
    write_run_dir(tmp_path / "b", records.assign(value=records["value"] + 1), runs, steps=4)
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n", encoding="utf-8")
    paths = sorted(str(p) for p in tmp_path.glob("*"))
    assert main([*paths, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    skipped = tmp_path / "multirun.yaml"
    assert err[0] == f"fia_bench.report: skipped {skipped} (files, not run directories)"
    assert len(err) == 2
    assert f"{tmp_path / 'a'} and {tmp_path / 'b'} differ in sampler.steps (2 vs 4)" in err[1]
    # a sweep of one protocol merges (the same glob, multirun.yaml skipped)
    (tmp_path / "b" / "records.csv").unlink()
    records.to_csv(tmp_path / "b" / "records.csv", index=False)
    assert main([*paths, "--out", str(tmp_path / "r")]) == 0
    # older records (no prompt column, the forget role called "target") merge, rows once
    older = records.drop(columns="prompt").replace({"role": {"forget": "target"}})
    older.to_csv(tmp_path / "b" / "records.csv", index=False)
    assert main([*paths, "--out", str(tmp_path / "r")]) == 0
    merged = pd.read_csv(tmp_path / "r" / "records.csv")
    assert len(merged) == len(records) and set(merged["role"]) == {"forget"}


def test_a_row_measured_again_within_rounding_keeps_the_first_runs_value(tmp_path, capsys) -> None:
    """The reference measured again on another machine differs by rounding: the merge keeps the
    first run's values and says so in one line; beyond REMEASURED_RTOL it is refused."""
    from fia_bench.report import REMEASURED_RTOL, main

    records, runs = job_rows({("none", 0): (20.0, 30.0), ("uce", 0): (1.0, 2.0)})
    write_run_dir(tmp_path / "a", records, runs)
    none = records["method"] == "none"
    again = records[none].assign(value=records["value"] * (1 + REMEASURED_RTOL / 4))
    write_run_dir(tmp_path / "b", again, runs[runs["method"] == "none"])
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "r"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (
        f"fia_bench.report: 2 rows measured again by a later run (first: {b}) agree with the "
        f"first within rounding (largest difference 0.0075, tolerance {REMEASURED_RTOL:g} of "
        "each metric's largest value); the first run's values are kept"
    )
    merged = pd.read_csv(out / "records.csv")
    assert list(merged.loc[merged["method"] == "none", "value"]) == [20.0, 30.0]
    assert set(merged["run_dir"]) == {str(a)}
    (b / "records.csv").unlink()
    records[none].assign(value=records["value"] * (1 + 4 * REMEASURED_RTOL)).to_csv(
        b / "records.csv", index=False
    )
    assert main([str(a), str(b), "--out", str(out)]) == 2
    assert "runs disagree on none n_concepts=1 seed=0" in capsys.readouterr().err


def two_runs(tmp_path) -> tuple:
    """Run folders a (none, uce) and b (none, esd), 2 seeds each, of one model build; both
    measured the reference alike."""
    jobs = {("none", 0): (1.0, 2.0), ("uce", 0): (0.0, 1.0), ("none", 1): (3.0, 4.0)}
    jobs |= {("uce", 1): (1.0, 1.0), ("esd", 0): (2.0, 0.0), ("esd", 1): (1.0, 3.0)}
    records, runs = job_rows(jobs)
    records = records.assign(model="tiny")
    for name, methods in (("a", ("none", "uce")), ("b", ("none", "esd"))):
        write_run_dir(
            tmp_path / name,
            records[records["method"].isin(methods)],
            runs[runs["method"].isin(methods)],
        )
    return tmp_path / "a", tmp_path / "b"


def test_a_merged_report_grows_by_merging_it_with_new_runs(tmp_path, capsys) -> None:
    """Runs merged into a report, then the report merged with one more run, give the tables
    that merging all the runs at once gives: a published report is extended on a machine
    that never had its runs."""
    from fia_bench.report import main

    a, b = two_runs(tmp_path)
    assert main([str(a), str(b), "--out", str(tmp_path / "at_once")]) == 0
    # the published report keeps its records gzipped, byte-identical when rewritten
    first = tmp_path / "first"
    assert main([str(a), "--gzip-records", "--out", str(first)]) == 0
    packed = (first / "records.csv.gz").read_bytes()
    assert not (first / "records.csv").exists()
    assert main([str(a), "--gzip-records", "--out", str(first)]) == 0
    assert (first / "records.csv.gz").read_bytes() == packed
    # a damaged or cut-off one is refused in one line naming the file
    for damaged in (b"\x1f\x8bnot gzip", packed[: len(packed) // 2]):
        broken = tmp_path / "broken"
        shutil.copytree(first, broken, dirs_exist_ok=True)
        (broken / "records.csv.gz").write_bytes(damaged)
        assert main([str(broken), "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert f"{broken / 'records.csv.gz'}: not a readable CSV table" in err
        assert err.count("\n") == 1
    shutil.rmtree(a)  # the report alone travels
    assert main([str(first), str(b), "--out", str(tmp_path / "grown")]) == 0
    for table in ("summary.csv", "tests.csv", "runs.csv", "records.csv"):
        at_once = (tmp_path / "at_once" / table).read_text(encoding="utf-8")
        assert (tmp_path / "grown" / table).read_text(encoding="utf-8") == at_once, table
    manifest = json.loads((tmp_path / "grown" / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["merged_runs"]) == {str(a), str(b)}
    assert manifest["model_weights"] == {"tiny": "ab" * 32}
    # the grown report merges again, and a build of the model it does not hold is refused
    assert main([str(tmp_path / "grown"), "--out", str(tmp_path / "again")]) == 0
    other = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    other["inputs"]["model_weights"] = "cd" * 32
    (b / "manifest.json").write_text(json.dumps(other), encoding="utf-8")
    assert main([str(tmp_path / "first"), str(b), "--out", str(tmp_path / "mixed")]) == 2
    assert "loaded different weights" in capsys.readouterr().err
    # a report merged before reports recorded their runs says what to merge instead
    old = json.loads((tmp_path / "first" / "manifest.json").read_text(encoding="utf-8"))
    del old["model_weights"]
    (tmp_path / "first" / "manifest.json").write_text(json.dumps(old), encoding="utf-8")
    assert main([str(tmp_path / "first"), "--out", str(tmp_path / "old")]) == 2
    assert "merge the run directories its merged_runs lists" in capsys.readouterr().err


def test_a_merged_report_keeps_its_grid_for_a_machine_without_the_caches(tmp_path, capsys) -> None:
    """A report copies the images its grid shows into grid_images/ (none larger than a tile), so
    merging it after its runs and their caches are gone draws the same grid; a tile whose image
    is nowhere, or damaged, stays blank and is counted in one line."""
    import numpy as np
    from PIL import Image

    from fia_bench.cache import Cache
    from fia_bench.report import GRID_TILE, REPORT_IMAGES, main

    records, runs = job_rows({("none", 0): (1.0, 2.0), ("uce", 0): (0.0, 1.0)})
    records = records.assign(model="tiny", image_key=[f"key{i}" for i in range(len(records))])
    write_run_dir(tmp_path / "a", records, runs)
    cache, rng = Cache(tmp_path / "a" / "cache"), np.random.default_rng(0)
    for key, size in zip(records["image_key"], (200, 32, 32, 32), strict=True):
        path = cache.path("images", key, ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    first = tmp_path / "first"
    assert main([str(tmp_path / "a"), "--out", str(first)]) == 0
    # the grid shows prompt p0 of each method: key0 (none, 200 px, kept at a tile) and key2
    kept = {}
    for path in (first / REPORT_IMAGES).iterdir():
        with Image.open(path) as image:
            kept[path.name] = image.size
    assert kept == {"key0.png": (GRID_TILE, GRID_TILE), "key2.png": (32, 32)}
    shutil.rmtree(tmp_path / "a")  # runs and cache gone: the report alone travels
    capsys.readouterr()
    assert main([str(first), "--out", str(tmp_path / "grown")]) == 0
    assert "blank" not in capsys.readouterr().err
    with Image.open(first / "grid.png") as a, Image.open(tmp_path / "grown" / "grid.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # an image of the same key generated again (another thread count: a pixel off) does not
    # change the published grid: the report's copy comes first
    again = cache.path("images", "key2", ".png")
    again.parent.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(again)
    assert main([str(first), "--out", str(tmp_path / "grown")]) == 0
    with Image.open(first / "grid.png") as a, Image.open(tmp_path / "grown" / "grid.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    (first / REPORT_IMAGES / "key2.png").write_bytes(b"not a png")
    (first / REPORT_IMAGES / "key0.png").unlink()
    assert main([str(first), "--out", str(tmp_path / "blank")]) == 0
    err = capsys.readouterr().err
    assert "grid.png: 2 of 2 tiles blank" in err and "(first: key0)" in err
    assert not (tmp_path / "blank" / REPORT_IMAGES).exists()
    # a report rewritten in place keeps what it still shows and drops what it no longer does
    assert main([str(tmp_path / "grown"), "--out", str(tmp_path / "grown")]) == 0
    assert sorted(p.name for p in (tmp_path / "grown" / REPORT_IMAGES).iterdir()) == [
        "key0.png",
        "key2.png",
    ]
    assert (
        main([str(tmp_path / "grown"), "--grid-prompts", "0", "--out", str(tmp_path / "grown")])
        == 0
    )
    assert list((tmp_path / "grown" / REPORT_IMAGES).iterdir()) == []


def test_a_dropped_method_leaves_the_report_as_if_never_merged(tmp_path, capsys) -> None:
    """--drop-method takes a column out of a published report (a preset row its rerun
    replaces) with the runs that then have no row; a name not merged, or the reference, is
    refused in one line."""
    from fia_bench.report import main

    a, b = map(str, two_runs(tmp_path))
    assert main([a, b, "--gzip-records", "--out", str(tmp_path / "both")]) == 0
    assert main([a, "--out", str(tmp_path / "only_a")]) == 0
    dropped = tmp_path / "dropped"
    assert main([str(tmp_path / "both"), "--drop-method", "esd", "--out", str(dropped)]) == 0
    for table in ("summary.csv", "tests.csv", "runs.csv", "records.csv"):
        only_a = (tmp_path / "only_a" / table).read_text(encoding="utf-8")
        assert (dropped / table).read_text(encoding="utf-8") == only_a, table
    manifest = json.loads((dropped / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["merged_runs"]) == {a}  # b's reference rows are a's, kept once
    capsys.readouterr()
    assert main([a, b, "--drop-method", "esdd", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'esdd' in the merged runs; valid choices: esd, none, uce" in err
    assert "did you mean 'esd'?" in err and err.count("\n") == 1
    assert main([a, "--drop-method", "none", "--out", str(tmp_path / "never")]) == 2
    assert "--drop-method none: it is the reference" in capsys.readouterr().err


def summary_of(values: dict[tuple[str, str, str], tuple[float, float]]) -> pd.DataFrame:
    """Summary rows (method, metric, role) → (mean, std) at n_concepts=1."""
    return pd.DataFrame(
        [
            {
                "method": m,
                "n_concepts": 1,
                "evaluator": "e",
                "metric": metric,
                "role": role,
                "mean": mean,
                "std": std,
                "n_seeds": 3,
                "n_samples": 6,
                "higher_is_better": True,
            }
            for (m, metric, role), (mean, std) in values.items()
        ]
    )


def test_figures_read_at_a_glance(tmp_path) -> None:
    """Forget panels left of retain, units on the y axis, one colour per method in every
    figure (its settings share it), error bars that stop at the metric's range."""
    from matplotlib.colors import to_hex

    from fia_bench.report import METHOD_COLOURS, metrics_figure, tradeoff_figure

    methods = ["none", "fia", "uce", "uce[lamb=0.1]"]
    values = {
        (m, metric, role): (95.0 - 10 * i, 20.0)
        for i, m in enumerate(methods)
        for metric in ("accuracy", "clip_score")
        for role in ("retain", "forget")
    }
    fig = metrics_figure(summary_of(values), methods)
    axes = fig.axes
    assert [a.get_title() for a in axes] == [
        "e/accuracy (forget)",
        "e/accuracy (retain)",
        "e/clip_score (forget)",
        "e/clip_score (retain)",
    ]
    assert [a.get_ylabel() for a in axes] == ["accuracy (%)"] * 2 + [
        "CLIP score (100 × cosine)"
    ] * 2
    for ax in axes:
        bars = {c.get_label(): c for c in ax.containers}
        assert list(bars) == methods
        for method, bar in bars.items():
            assert to_hex(bar.lines[0].get_color()) == METHOD_COLOURS[method.partition("[")[0]]
            low, high = bar.lines[2][0].get_segments()[0][:, 1]
            assert 0 <= low < high <= 100  # none: 95 ± 20 stops at 100
        assert bars["none"].lines[2][0].get_segments()[0][1, 1] == 100
    # the same colour in another report with other methods
    other = metrics_figure(summary_of({("uce", "accuracy", "forget"): (5.0, 9.0)}), ["uce"])
    bar = other.axes[0].containers[0]
    assert to_hex(bar.lines[0].get_color()) == METHOD_COLOURS["uce"]
    assert bar.lines[2][0].get_segments()[0][0, 1] == 0  # 5 ± 9 stops at 0
    trade = tradeoff_figure(summary_of(values), methods)
    assert [a.get_xlabel() for a in trade.axes] == [
        "forget: accuracy (%)",
        "forget: CLIP score (100 × cosine)",
    ]
    assert trade.axes[0].get_ylabel() == "retain: accuracy (%)"
    assert [t.get_text() for t in trade.axes[0].texts] == methods


def test_a_long_setting_list_wraps_and_its_figures_lay_out(tmp_path) -> None:
    import warnings

    from fia_bench.report import figure_label, metrics_figure, save_figure, tradeoff_figure

    method = "dynamic_mask[" + ",".join(f"setting_{i}={i / 7:.6f}" for i in range(8)) + "]"
    label = figure_label(method)
    assert label.replace("\n", "") == method
    assert all(len(line) <= 40 for line in label.splitlines())
    assert figure_label("uce[lamb=0.1]") == "uce[lamb=0.1]"
    assert figure_label("esd[iterations=200,lr=0.0003]", 15).splitlines() == [
        "esd[",
        "iterations=200,",
        "lr=0.0003]",
    ]
    values = {
        (m, "accuracy", role): (50.0, 5.0)
        for m in ("none", method)
        for role in ("forget", "retain")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when its layout gives up
        save_figure(metrics_figure(summary_of(values), ["none", method]), tmp_path / "m.png")
        save_figure(tradeoff_figure(summary_of(values), ["none", method]), tmp_path / "t.png")


def test_overall_is_explained_under_its_table_and_warnings_count_the_tables_pairs(
    tmp_path,
) -> None:
    import re

    from fia_bench.report import OVERALL_NOTE, ImageSources, write_report

    # uce equals none on the retain concept (zero differences), differs on the forget concept
    values = {("none", s): (80.0, 90.0) for s in range(3)}
    values |= {("uce", 0): (10.0, 90.0), ("uce", 1): (20.0, 90.0), ("uce", 2): (15.0, 90.0)}
    records = pd.DataFrame(
        [
            record(m, s, p, "accuracy", v, c, role)
            for (m, s), (forget, kept) in values.items()
            for p, v, c, role in (
                ("p0", forget, "tench", "forget"),
                ("p1", kept, "church", "retain"),
            )
        ],
        columns=RECORD_COLUMNS,
    )
    runs = ok_runs(values, ["p0", "p1"])
    _, tests = write_report(tmp_path, records, runs, ImageSources(), 0.05, 0)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    table_end = report.index("| **Overall (H)** |")
    assert report[table_end:].split("\n\n", 1)[1].startswith(OVERALL_NOTE)
    assert report.count(OVERALL_NOTE) == 1
    warned = tests[tests["warning"] != ""]
    assert len(warned) == 2
    for row in warned.itertuples():
        shown = re.search(rf"\| {row.role} \| uce vs none \| (\d+) \|", report)
        assert shown and int(shown.group(1)) == row.n_pairs
        if row.n_nonzero:
            assert row.warning.startswith(f"{row.n_nonzero} of {row.n_pairs} pairs differ")
    assert f"2 of the {len(tests)} comparisons above cannot reach" in report


def test_a_merged_report_keeps_the_tasks_concept_order(tmp_path) -> None:
    """The tiny objects task lists tench, english springer, cassette player, chain saw; prompt
    ids that sort the other way round must not reorder the merged tables."""
    from fia_bench.report import main

    concepts = [("tench", "forget"), ("english springer", "retain"), ("cassette player", "retain")]
    ids = ["z-tench", "y-springer", "x-cassette"]
    dirs = []
    for seed in (0, 1):
        records = pd.DataFrame(
            [
                record(m, seed, pid, "accuracy", 50.0, concept, role)
                for m in ("none", "uce")
                for pid, (concept, role) in zip(ids, concepts, strict=True)
            ],
            columns=RECORD_COLUMNS,
        )
        runs = ok_runs([("none", seed), ("uce", seed)], ids)
        dirs.append(tmp_path / f"seed{seed}")
        write_run_dir(dirs[-1], records, runs)
    assert main([*map(str, dirs), "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    rows = [
        line.split(" |")[0].lstrip("| ") for line in report.splitlines() if "(retain) |" in line
    ]
    assert rows == ["english springer (retain)", "cassette player (retain)"]
    merged = pd.read_csv(tmp_path / "r" / "records.csv")
    assert list(merged["concept"].head(3)) == [c for c, _ in concepts]


def test_the_image_grid_has_a_labelled_block_per_concept_count_forget_rows_first(tmp_path) -> None:
    from PIL import Image

    from fia_bench.report import (
        GRID_BLOCK_H,
        GRID_HEAD_PAD,
        GRID_LABEL_W,
        GRID_LINE_H,
        GRID_TILE,
        ImageSources,
        grid_rows,
        image_grid,
    )

    order = ["tench", "english springer", "cassette player", "chain saw", "church", "gas pump"]
    rows = []
    for n in (1, 3):
        for m in ("none", "uce"):
            # prompt rows in reverse: the grid orders them itself
            for i, concept in reversed(list(enumerate(order))):
                role = "forget" if i < n else "retain"
                for k in range(2):
                    rows.append(
                        record(m, 0, f"{concept}-{k}", "accuracy", 0.0, concept, role)
                        | {"n_concepts": n, "prompt": f"a photo {k} of a {concept}"}
                        | {"image_key": f"{m}{n}{concept}{k}"}
                    )
    records = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    layout = grid_rows(records, order, per_count=12)
    assert [(n, role, concept) for n, role, concept, _, _ in layout] == [
        (1, "forget", "tench"),
        *((1, "retain", c) for c in order[1:]),
        *((3, "forget", c) for c in order[:3]),
        *((3, "retain", c) for c in order[3:]),
    ]
    assert layout[0][3:] == ("tench-0", "a photo 0 of a tench")
    assert len(grid_rows(records, order, per_count=5)) == 10  # five per concept count
    image_grid(records, ImageSources(), tmp_path / "grid.png", 12, order)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (
            GRID_LABEL_W + 2 * GRID_TILE,
            GRID_HEAD_PAD
            + GRID_LINE_H
            + 2 * GRID_BLOCK_H
            + len(layout) * GRID_TILE,  # one header line
        )
