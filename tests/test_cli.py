"""The command line end to end: tables, cache reuse, multirun + merge, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, cli

import fia_bench
from fia_bench.report import main as report_main

TABLES = ("report.md", "report.tex", "summary.csv", "tests.csv", "records.csv", "runs.csv")


def generated(stdout: str) -> tuple[int, int]:
    match = re.search(r"generated (\d+) images \((\d+) from cache\)", stdout)
    assert match, stdout[-2000:]
    return int(match.group(1)), int(match.group(2))


def test_run_writes_tables_and_rerun_is_served_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    args = [*FAST, "seeds=2", "n_concepts=[1,3]"]
    first = cli([*args, f"hydra.run.dir={tmp_path / 'a'}"], cache, tmp_path)
    # the rerun in this process (no second start-up): served from the cache, scores included,
    # so it writes the command line's tables byte for byte
    monkeypatch.setenv("FIA_BENCH_CACHE", str(cache))
    second = fia_bench.run(args, out_dir=str(tmp_path / "b"))

    # 10 concepts x 2 prompts x 2 seeds; the n=3 split reuses n=1's images (same prompts, seeds).
    assert generated(first.stdout) == (40, 40)
    assert (second.counts["images_generated"], second.counts["images_cached"]) == (0, 80)
    for name in TABLES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for name in ("metrics_vs_n.png", "grid.png", "manifest.json"):
        assert (tmp_path / "a" / name).stat().st_size > 0

    records = pd.read_csv(tmp_path / "a" / "records.csv")
    # one row per (n, seed, prompt, metric): 2 n x 2 seeds x 20 prompts x 2 metrics
    assert len(records) == 2 * 2 * 20 * 2
    assert set(records["role"]) == {"forget", "retain"}
    assert records["protocol"].str.len().min() > 0
    # the report names the judge's and the model's weights: a retrained model shows in it
    report = (tmp_path / "a" / "report.md").read_text(encoding="utf-8")
    weights = json.loads((tmp_path / "a" / "manifest.json").read_text())["inputs"]
    assert f"model weights `{weights['model_weights'][:12]}`" in report
    assert re.search(r"clip=tiny_random seed \d+ \(weights [0-9a-f]{12}\)", report)
    summary = pd.read_csv(tmp_path / "a" / "summary.csv")
    assert set(summary["n_seeds"]) == {2}
    assert "Avg forget" in first.stdout
    # stderr is not a terminal here (as in a log file): plain progress lines, no bar redraws
    assert "\r" not in first.stderr and "\x1b" not in first.stderr
    assert "[fia_bench] jobs: 4/4 job (" in first.stderr


def test_multirun_and_report_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A sweep over a method's settings merges into one report, each setting a method of its
    own named by what differs from the defaults (UCE's lamb is 0.5 by default), through the
    README's literal glob over the sweep folder (which also matches Hydra's multirun.yaml)."""
    cache = tmp_path / "cache"
    sweep = tmp_path / "sweep"
    cli(
        [
            "-m",
            *FAST,
            "method=uce",
            "method.settings.lamb=0.5,0.1",
            "seeds=2",
            "n_concepts=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cache,
        tmp_path,
    )
    runs = sorted(p for p in sweep.iterdir() if (p / "records.csv").exists())
    assert len(runs) == 4
    merged = tmp_path / "merged"
    glob = sorted(map(str, sweep.glob("*")))
    assert str(sweep / "multirun.yaml") in glob
    proc = cli([*glob, "--out", str(merged)], cache, tmp_path, module="fia_bench.report")
    assert "skipped " + str(sweep / "multirun.yaml") in proc.stderr
    report = (merged / "report.md").read_text(encoding="utf-8")
    assert "| concept | none | uce | uce[lamb=0.1] |" in report
    assert "model weights `" in report
    summary = pd.read_csv(merged / "summary.csv")
    assert sorted(summary["n_concepts"].unique()) == [1, 2]
    assert set(summary["method"]) == {"none", "uce", "uce[lamb=0.1]"}
    # every run also measured the reference; the merge keeps each reference row once
    parts = pd.concat([pd.read_csv(r / "records.csv") for r in runs])
    assert len(pd.read_csv(merged / "records.csv")) == len(parts.drop_duplicates())
    assert len(parts) > len(parts.drop_duplicates())
    tests = pd.read_csv(merged / "tests.csv")
    assert set(zip(tests["method_a"], tests["method_b"], strict=True)) == {
        ("uce", "none"),
        ("uce[lamb=0.1]", "none"),
        ("uce", "uce[lamb=0.1]"),
    }
    assert "![forget against retain, one point per method and setting](tradeoff.png)" in report
    assert (merged / "tradeoff.png").stat().st_size > 0
    # a run of a rebuilt model (same name, other weights) is refused, not merged beside the others
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    manifest["inputs"]["model_weights"] = "0" * 64
    (runs[0] / "manifest.json").write_text(json.dumps(manifest))
    # (in this process: the command line's one-line errors are tested below)
    assert report_main([*map(str, runs), "--out", str(tmp_path / "mixed")]) == 2
    assert "runs of model 'tiny_random' loaded different weights" in capsys.readouterr().err


def test_wandb_logger_writes_an_offline_run_in_out_dir_and_no_dated_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli(
        [*FAST, "seeds=1", "n_concepts=1", "logger=wandb", f"out_dir={out}"],
        tmp_path / "cache",
        tmp_path,
    )
    assert (out / "report.md").is_file()
    assert list((out / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "outputs").exists()  # out_dir= replaces Hydra's dated run folder


def test_report_refuses_a_directory_without_results(tmp_path: Path) -> None:
    proc = cli(
        [str(tmp_path), "--out", str(tmp_path / "r")],
        tmp_path / "c",
        tmp_path,
        check=False,
        module="fia_bench.report",
    )
    assert proc.returncode == 2
    assert "not a fia_bench run directory" in proc.stderr


# through the real command line (a subprocess): its stderr is one line, no trace. The many bad
# values themselves are tested in-process by tests/test_bad_input.py.
BAD_INPUT = [
    (["method=uec"], "unknown method 'uec'"),
    (["task=nudes"], "task"),
    (["method=uce", "method.settings.lamd=1"], "did you mean 'method.settings.lamb'"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUT)
def test_bad_input_fails_with_one_clear_line(
    tmp_path: Path, override: list[str], message: str
) -> None:
    proc = cli(
        [*override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "cache", tmp_path, check=False
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_help_names_the_project_and_only_the_groups_a_user_picks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fia_bench import cli as command_line

    monkeypatch.setattr("sys.argv", ["fia_bench", "--help"])
    command_line.main()
    text = capsys.readouterr().out
    assert text.startswith("fia_bench: a reproducible benchmark harness for concept unlearning")
    groups = [line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  ")]
    assert [g for g in groups if g in command_line.USER_GROUPS] == list(command_line.USER_GROUPS)
    for option in ("uce", "tiny_random", "fia/table1", "smoke", "clip_accuracy"):
        assert option in text
    for internal in ("parts/", "arm/", "preset_caps", "task_prompts", "Powered by Hydra"):
        assert internal not in text
