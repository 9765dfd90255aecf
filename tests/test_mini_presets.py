"""The mini presets (experiments/mini_presets.py, docs/mini_presets.md): chosen on held-out
classes only, swept over settings the methods really have, the file written is the table's best
point, and preset=mini applies exactly it under a name that differs from the paper row's."""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import yaml
from conftest import FAST

import fia_bench
from fia_bench import tasks
from fia_bench.errors import FiaBenchError
from fia_bench.records import method_label
from fia_bench.runner import label_defaults
from fia_bench.validate import plain

REPO = Path(__file__).resolve().parent.parent
GRID = REPO / "experiments" / "mini_presets.yaml"
# what issue 16 asks to sweep, by the names the methods' configs use
SWEPT = {
    "esd": {"lr", "iterations"},
    "dynamic_mask": {"lr", "epochs"},
    "fia": {"r2", "alpha"},
    "uce": {"lamb", "erase_scale", "preserve_retain"},
    "scapre": {"erase_scale"},
}
# two closed-form methods, five runs in all: seconds on the tiny world
TINY_GRID = {"uce": {"lamb": [0.1], "erase_scale": [1.0, 4.0]}, "scapre": {"erase_scale": [1.0]}}
TINY_RUN = ["n_concepts=1", *FAST]


@pytest.fixture(scope="module")
def script() -> ModuleType:
    path = REPO / "experiments" / "mini_presets.py"
    spec = importlib.util.spec_from_file_location("mini_presets", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def options(tmp_path: Path, grid: dict) -> list[str]:
    """The script's options for a run on the tiny world that writes only under ``tmp_path``."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"methods": grid}, sort_keys=False), encoding="utf-8")
    return [
        *("--model", "tiny_random", "--seeds", "1", "--grid", str(path)),
        *("--out-conf", str(tmp_path / "mini"), "--doc", str(tmp_path / "doc.md")),
        *("--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")),
    ]


def settings(method: str) -> dict:
    return plain(fia_bench.compose([f"method={method}"]).method.settings)


def section(doc: str, method: str) -> list[str]:
    begin = doc.index(f"<!-- mini_presets:{method} begin")
    return doc[begin : doc.index(f"<!-- mini_presets:{method} end")].splitlines()


@pytest.mark.parametrize(
    "world",
    [w for w in tasks.worlds() if (tasks.data_root() / w / "objects_heldout.yaml").exists()],
)
def test_heldout_classes_are_disjoint_from_every_reported_task(script, world: str) -> None:
    heldout = tasks.load_task("objects_heldout", world)
    assert heldout.kind == "objects"  # the methods apply their objects settings to it
    for path in (tasks.data_root() / world).glob("*.yaml"):
        if path.stem != heldout.name:
            theirs = tasks.load_task(path.stem, world).concepts
            assert not set(heldout.concepts) & set(theirs), path.stem
    assert script.check_heldout("objects_heldout", world) == heldout


def test_the_tiny_heldout_task_leaves_the_tiny_vocabulary_as_it_was(tmp_path, monkeypatch) -> None:
    """Its words are the other task files' words, so the tiny model's tokenizer and weights, and
    every cached tiny result, are the same as without it."""
    world = tasks.data_root() / "tiny"
    shutil.copytree(world, tmp_path / "tiny", ignore=shutil.ignore_patterns("objects_heldout.*"))
    with_heldout = tasks.world_vocabulary("tiny")
    monkeypatch.setattr(tasks, "data_root", lambda: tmp_path)
    assert tasks.world_vocabulary("tiny") == with_heldout


def test_every_grid_names_real_settings_and_preset_mini_applies_each_point(script) -> None:
    grid = script.load_grid(GRID)
    assert {m: set(sweep) for m, sweep in grid.items()} == SWEPT
    assert fia_bench.compose(["preset=mini"]).preset_kind is None  # it names its runs
    for method, sweep in grid.items():
        defaults = settings(method)
        points = script.candidates(method, sweep, defaults, f"methods.{method}")
        assert points[0].defaults and points[0].settings == {k: defaults[k] for k in sweep}
        assert not any(p.defaults for p in points[1:])
        assert 4 <= len(points) <= 30, method  # each point is a full three-seed run
        for point in (points[0], points[-1]):
            cfg = script.compose_with_presets({method: point.settings}, [f"method={method}"])
            assert plain(cfg.method.settings) == defaults  # without preset=mini: the config
            cfg = script.compose_with_presets(
                {method: point.settings}, [f"method={method}", "preset=mini"]
            )
            assert plain(cfg.method.settings) == defaults | point.settings
            # named by what it changes: apart from the paper row, unless it is the paper row
            label = method_label(method, plain(cfg.method.settings), label_defaults(cfg, "mini"))
            assert (label == method) == point.defaults, label
    cfg = script.compose_with_presets({}, ["method=uce", "preset=mini"])
    assert plain(cfg.method.settings) == settings("uce")  # no preset file: the config


def test_the_highest_overall_wins_and_ties_go_to_the_defaults_then_the_grid(script) -> None:
    candidate, point = script.Candidate, script.Point
    own = point(candidate({"lr": None}, True, 0), "esd", 50.0, 90.0, 64.29)
    a = point(candidate({"lr": 1e-4}, False, 1), "esd[lr=0.0001]", 10.0, 80.0, 84.71)
    b = point(candidate({"lr": 3e-4}, False, 2), "esd[lr=0.0003]", 10.0, 80.0, 84.71 + 1e-9)
    broken = point(candidate({"lr": 1.0}, False, 3), "esd[lr=1]", *[math.nan] * 3, "NaN weights")
    assert script.best_point("esd", [own, b, a, broken]) is a
    tied_own = point(own.candidate, "esd", 10.0, 80.0, 84.71)
    assert script.best_point("esd", [b, a, tied_own]) is tied_own
    with pytest.raises(FiaBenchError, match="every candidate of esd failed; the first: NaN"):
        script.best_point("esd", [broken])


def test_the_sweep_writes_its_best_point_and_preset_mini_applies_it(
    script, tmp_path: Path, cache_dir: Path
) -> None:
    argv = [*options(tmp_path, TINY_GRID), *TINY_RUN]
    done = script.run_sweep(argv)
    assert list(done) == ["uce", "scapre"]
    doc = (tmp_path / "doc.md").read_text(encoding="utf-8")
    for method, sweep in done.items():
        defaults = settings(method)
        own = sweep.points[0]
        assert own.candidate.defaults and own.label == method
        assert own.candidate.settings == {k: defaults[k] for k in TINY_GRID[method]}
        assert len(sweep.points) == {"uce": 3, "scapre": 2}[method]  # uce's 1.0 is its default
        assert all(not p.failed for p in sweep.points)
        assert sweep.best.overall == max(p.overall for p in sweep.points)
        written = yaml.safe_load((tmp_path / "mini" / f"{method}.yaml").read_text())
        assert written == sweep.best.candidate.settings
        rows = section(doc, method)
        assert f"`python experiments/mini_presets.py {shlex.join(argv)}`" in rows
        table = [r for r in rows if r.startswith("| ") and "`" in r]
        assert [re.search(r"`([^`]+)`", r).group(1) for r in table] == [
            p.label for p in sweep.points
        ]
        (best_row,) = [r for r in table if "**best**" in r]
        assert f"`{sweep.best.label}`" in best_row
        cfg = script.compose_with_presets({method: written}, [f"method={method}", "preset=mini"])
        assert plain(cfg.method.settings) == defaults | written
        shown = method_label(method, plain(cfg.method.settings), label_defaults(cfg, "mini"))
        assert shown == sweep.best.label
    # a rerun of one method (cached) replaces its section and keeps the other's
    script.run_sweep([*argv[: -len(TINY_RUN)], "--methods", "uce", *TINY_RUN])
    again = (tmp_path / "doc.md").read_text(encoding="utf-8")
    assert again.count("<!-- mini_presets:uce begin") == 1
    assert section(again, "scapre") == section(doc, "scapre")


def test_a_sweep_grows_from_its_reports_on_a_machine_that_never_ran_them(
    script, tmp_path: Path, cache_dir: Path, monkeypatch
) -> None:
    """Each method's points go to its report; a rerun on a machine without the runs or their
    cache scores them from it and runs nothing, a grown grid runs only its new point, and a
    changed protocol runs every point again and leaves the old ones out of the report."""
    from fia_bench.report import load_runs

    def methods_in(method: str) -> set[str]:
        records = load_runs([tmp_path / "reports" / method])[0]
        return set(records["method"]) - {"none"}

    argv = [*options(tmp_path, TINY_GRID), *TINY_RUN]
    first = script.run_sweep(argv)
    for method, sweep in first.items():
        assert methods_in(method) == {p.label for p in sweep.points}
    doc = (tmp_path / "doc.md").read_text(encoding="utf-8")
    packed = (tmp_path / "reports" / "uce" / "records.csv.gz").read_bytes()
    monkeypatch.setenv("FIA_BENCH_CACHE", str(tmp_path / "new_machine"))
    shutil.rmtree(tmp_path / "runs")
    ran: list[list[str]] = []
    run = fia_bench.run
    monkeypatch.setattr(fia_bench, "run", lambda o, **kw: ran.append(o) or run(o, **kw))
    again = script.run_sweep(argv)
    assert ran == []
    assert {m: s.points for m, s in again.items()} == {m: s.points for m, s in first.items()}
    assert (tmp_path / "doc.md").read_text(encoding="utf-8") == doc
    assert (tmp_path / "reports" / "uce" / "records.csv.gz").read_bytes() == packed
    # a point whose job failed is run again, and its new rows replace the failed ones
    jobs_csv = tmp_path / "reports" / "uce" / "runs.csv"
    jobs = pd.read_csv(jobs_csv, keep_default_na=False)
    jobs.loc[jobs["method"] == "uce[lamb=0.1]", ["status", "reason"]] = ["failed", "killed"]
    jobs.to_csv(jobs_csv, index=False)
    script.run_sweep(argv)
    assert [o[-2:] for o in ran] == [
        ["method.settings.lamb=0.1", "method.settings.erase_scale=1.0"]
    ]
    assert set(pd.read_csv(jobs_csv)["status"]) == {"ok"}
    ran.clear()
    grown = {"uce": {"lamb": [0.1], "erase_scale": [1.0, 4.0, 2.0]}}
    argv = [*options(tmp_path, grown), *TINY_RUN]
    (sweep,) = script.run_sweep(argv).values()
    assert [o[-1] for o in ran] == ["method.settings.erase_scale=2.0"]
    assert methods_in("uce") == {p.label for p in sweep.points} and len(sweep.points) == 4
    assert sweep.points[:3] == first["uce"].points
    ran.clear()
    other = ["n_concepts=1", "sampler.steps=3", *FAST[1:]]
    assert FAST[0] == "sampler.steps=2"
    (sweep,) = script.run_sweep([*options(tmp_path, grown), *other]).values()
    assert len(ran) == 4 and methods_in("uce") == {p.label for p in sweep.points}
    configs = load_runs([tmp_path / "reports" / "uce"])[3]
    assert {c["sampler"]["steps"] for c in configs.values()} == {3}


def heldout_file(tmp_path: Path, monkeypatch, concepts: list[str] | None) -> None:
    """The tiny world's task files under ``tmp_path``, its held-out task holding ``concepts``
    (None: no held-out task)."""
    shutil.copytree(tasks.data_root() / "tiny", tmp_path / "data" / "tiny")
    path = tmp_path / "data" / "tiny" / "objects_heldout.yaml"
    path.unlink()
    if concepts is not None:
        data = {"kind": "objects", "concepts": concepts, "templates": ["a photo of a {concept}"]}
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setattr(tasks, "data_root", lambda: tmp_path / "data")


ONE = {"uce": {"lamb": [0.1]}}


@pytest.mark.parametrize(
    ("grid", "extra", "heldout", "message"),
    [
        pytest.param(
            {"uce": {"lamd": [0.1]}},
            [],
            ...,
            r"grid\.yaml: unknown setting 'lamd' in methods\.uce; "
            r"valid choices: .*lamb.*; did you mean 'lamb'\?",
            id="unknown-setting",
        ),
        pytest.param(
            {"uec": {"lamb": [0.1]}}, [], ..., r"unknown method 'uec' in methods\.uec", id="method"
        ),
        pytest.param(
            {"uce": {"lamb": ["big"]}},
            [],
            ...,
            r"methods\.uce\.lamb='big': must be a finite",
            id="bad-value",
        ),
        pytest.param(
            {"uce": {"lamb": []}}, [], ..., r"methods\.uce\.lamb: needs a non-empty", id="empty"
        ),
        pytest.param(
            ONE,
            ["--methods", "esd"],
            ...,
            r"unknown method 'esd' in --methods \(the methods of .*grid\.yaml\)",
            id="not-in-grid",
        ),
        pytest.param(
            ONE, ["method.settings.lamb=1"], ..., "the sweep sets method", id="own-override"
        ),
        pytest.param(ONE, ["n_concepts=6"], ..., "n_concepts=6 erases every class", id="no-retain"),
        pytest.param(
            ONE,
            [],
            ["dog", "church", "rembrandt"],
            r"task=objects_heldout of world 'tiny' shares classes with reported tasks: "
            r"objects \(church\); styles \(rembrandt\); presets are chosen on held-out",
            id="overlap",
        ),
        pytest.param(
            ONE, [], None, r"world 'tiny' has no such task \(its tasks: ", id="no-heldout-task"
        ),
        pytest.param(
            ONE,
            ["--task", "objects"],
            ...,
            r"task=objects of world 'tiny' is a reported task, not a held-out one",
            id="reported-task",
        ),
    ],
)
def test_bad_input_is_refused_in_one_line_before_anything_runs(
    script, tmp_path: Path, monkeypatch, capsys, grid, extra, heldout, message
) -> None:
    if heldout is not ...:
        heldout_file(tmp_path, monkeypatch, heldout)
    flags = extra if extra and extra[0].startswith("--") else []
    overrides = [e for e in extra if e not in flags] or TINY_RUN
    assert script.main([*options(tmp_path, grid), *flags, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mini_presets: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "mini").exists() and not (tmp_path / "runs").exists()
