"""Choose each method's ``mini`` preset (docs/mini_presets.md): run every point of the method's
grid in experiments/mini_presets.yaml, and the method's own settings, on a world's held-out
classes (task=objects_heldout) only, never on a class that a reported table erases or keeps; score
each point with FIA's Overall (H); write the best point to
conf/preset_caps/method/mini/<method>.yaml, which preset=mini applies, and every point to a table
in docs/mini_presets.md with the command that produced it, and every point's rows to the
method's report, docs/mini_presets/<method>/. A rerun costs only what changed: a point that report
holds at the same protocol and settings is scored from it (so a grid grows on a machine that
never ran its other points), and runs and edits are cached.

    python experiments/mini_presets.py [--methods esd,uce] [--model mini] [--task objects_heldout]
        [--seeds 3] [--grid FILE] [--out-conf DIR] [--doc FILE] [--runs DIR] [--reports DIR]
        [key=value ...]

Trailing key=value words go to every run (task.prompts.settings.per_concept=8, device=cuda).
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import fia_bench
from fia_bench import tasks
from fia_bench.cache import write_text
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.records import setting_text
from fia_bench.resources import config_dir
from fia_bench.validate import plain

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

    from fia_bench.api import Task

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRID = HERE / "mini_presets.yaml"
OUT_CONF = REPO / "conf" / "preset_caps" / "method" / "mini"
DOC = REPO / "docs" / "mini_presets.md"
RUNS = REPO / "multirun" / "mini_presets"
REPORTS = REPO / "docs" / "mini_presets"
# a sweep report's image grid: rows per concept count (of every point, so kept short)
REPORT_GRID_PROMPTS = 4
PRESET = "mini"
# forget and preserve: the accuracy of the CLIP judge every world has (the mini CLIP on mini)
EVALUATOR, METRIC = "clip_accuracy", "accuracy"
# chosen by the script for every run: a trailing override of one would make the runs differ from
# what the preset file records
OWN_KEYS = ("method", "preset", "model", "task", "seeds", "evaluator")


@dataclass(frozen=True)
class Candidate:
    """One point of a method's sweep: the values of its swept settings."""

    settings: dict[str, Any]
    defaults: bool  # the method's own config values: its papers' settings
    order: int  # 0 for the defaults, then the grid's order (ties go to the lower)


@dataclass(frozen=True)
class Point:
    """A candidate's run: its label in reports and its scores (mean over seeds and concept
    counts); ``failed`` holds the reasons when a job of it failed (it then cannot be chosen)."""

    candidate: Candidate
    label: str
    forget: float
    preserve: float
    overall: float
    failed: str = ""


@dataclass(frozen=True)
class Measured:
    """A method's sweep report, as earlier sweeps left it: every point's rows, jobs and run
    config (by the run directory its rows name)."""

    folder: Path
    records: pd.DataFrame
    runs: pd.DataFrame
    configs: dict[str, dict[str, Any]]

    def label_of(self, planned: dict[str, Any], reference: str) -> str | None:
        """The label of the point the report holds at ``planned``'s settings and protocol, all
        its jobs successful (a failed one may not fail again: it is run)."""
        from fia_bench.report import protocol_keys

        for run, config in self.configs.items():
            if config.get("method") == planned["method"] and not protocol_keys(config, planned):
                labels = set(self.records.loc[self.records["run_dir"] == run, "method"])
                if len(labels - {reference}) == 1:
                    label = (labels - {reference}).pop()
                    jobs = self.runs[self.runs["method"] == label]
                    return label if (jobs["status"] == "ok").all() else None
        return None


def load_measured(folder: Path) -> Measured | None:
    """The method's sweep report, if an earlier sweep wrote one."""
    from fia_bench.report import load_runs

    if not (folder / "manifest.json").is_file():
        return None
    records, runs, _, configs, _ = load_runs([folder])
    return Measured(folder, records, runs, configs)


def planned_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved config a run of ``overrides`` would record (its manifest's ``config``)."""
    from omegaconf import OmegaConf, open_dict

    cfg = fia_bench.compose(overrides)
    with open_dict(cfg):
        cfg.out_dir = "unused"  # where it would write: not part of what it measures
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


@dataclass(frozen=True)
class MethodSweep:
    """What the sweep of one method wrote."""

    method: str
    points: list[Point]
    best: Point
    preset: Path


def shown(path: Path) -> str:
    """A path as messages and the docs name it: relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


# ---- checks before anything runs ---------------------------------------------------------------
def load_grid(path: Path) -> dict[str, dict[str, list[Any]]]:
    """The grid file's ``methods``: method → {setting: values}, checked for shape here; names
    and values are checked against each method's config and ``SETTINGS`` by ``candidates``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FiaBenchError(f"--grid {path}: cannot read it ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise FiaBenchError(f"--grid {path}: not YAML ({str(err).splitlines()[0]})") from err
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, dict) or not methods:
        raise FiaBenchError(f"{shown(path)}: needs 'methods:', a mapping of method to settings")
    grid = {}
    for method, sweep in methods.items():
        where = f"{shown(path)}: methods.{method}"
        if not isinstance(sweep, dict) or not sweep:
            raise FiaBenchError(f"{where}: needs a mapping of setting to a list of values")
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                raise FiaBenchError(f"{where}.{key}: needs a non-empty list of values, as [0.1, 1]")
            nested = [v for v in values if isinstance(v, dict | list)]
            if nested:
                raise FiaBenchError(
                    f"{where}.{key}: {nested[0]!r}: each value is one number, word, true/false "
                    "or null"
                )
            if len({repr(v) for v in values}) != len(values):
                raise FiaBenchError(f"{where}.{key}={values}: a value is listed twice")
        grid[str(method)] = {str(k): list(v) for k, v in sweep.items()}
    return grid


def check_heldout(task_name: str, world: str) -> Task:
    """The sweep's task, refused when it is not a held-out task file (one that declares the
    family it stands in for, ``kind:``) or shares a class with any other task file of its world:
    those are the tasks whose tables are reported, and a preset chosen on their classes would be
    tuned on what it is then measured on."""
    folder = tasks.data_root() / world
    if not (folder / f"{task_name}.yaml").is_file():
        names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise FiaBenchError(
            f"task={task_name}: world '{world}' has no such task (its tasks: {names}); presets "
            f"are chosen on a held-out task file, datasets/data/{world}/{task_name}.yaml (the "
            "mini world's comes with its second build, docs/mini_world.md)"
        )
    task = tasks.load_task(task_name, world)
    if task.kind == task.name:
        raise FiaBenchError(
            f"task={task_name} of world '{world}' is a reported task, not a held-out one: a "
            "held-out task file names the task family its classes stand in for (kind: objects) "
            f"and shares no class with the others; e.g. task=objects_heldout"
        )
    clashes = []
    for path in sorted(folder.glob("*.yaml")):
        if path.stem == task.name:
            continue
        theirs = {c.casefold() for c in tasks.load_task(path.stem, world).concepts}
        shared = [c for c in task.concepts if c.casefold() in theirs]
        if shared:
            clashes.append(f"{path.stem} ({', '.join(shared)})")
    if clashes:
        raise FiaBenchError(
            f"task={task_name} of world '{world}' shares classes with reported tasks: "
            f"{'; '.join(clashes)}; presets are chosen on held-out classes only, which no other "
            f"task file of datasets/data/{world}/ names"
        )
    return task


def method_settings(method: str, where: str) -> dict[str, Any]:
    """The method's settings as its config gives them (no preset): the defaults candidate."""
    from fia_bench.plugins import config_sources, group_options

    options = group_options(config_sources(), "method") or []
    if method not in options:
        raise unknown_choice("method", method, options, where)
    return plain(fia_bench.compose([f"method={method}"]).method.get("settings"))


def candidates(
    method: str, sweep: dict[str, list[Any]], defaults: dict[str, Any], where: str
) -> list[Candidate]:
    """The method's defaults (its config's values of the swept keys), then every combination of
    the grid in its order, less those equal to a candidate before them; each checked against the
    method's ``SETTINGS`` as a run's config would be."""
    from fia_bench.registry import METHODS

    for key in sweep:
        if key not in defaults:
            raise unknown_choice("setting", key, defaults, where)
    schema = METHODS.get(method, where).SETTINGS
    out = [Candidate({k: defaults[k] for k in sweep}, True, 0)]
    for values in itertools.product(*sweep.values()):
        point = dict(zip(sweep, values, strict=True))
        schema.check(defaults | point, where)
        if all(point != c.settings for c in out):
            out.append(Candidate(point, False, len(out)))
    return out


def compose_with_presets(presets: dict[str, dict[str, Any]], overrides: list[str]) -> DictConfig:
    """The config ``overrides`` compose to when conf/preset_caps/method/mini/ holds exactly
    ``presets`` (method → settings), whatever the repository's folder holds. It is composed from
    a copy of conf/, because Hydra takes a group's option from the first folder that has it and
    ours comes first."""
    from hydra import compose, initialize_config_dir

    with tempfile.TemporaryDirectory(prefix="mini_presets_") as tmp:
        conf = Path(tmp) / "conf"
        shutil.copytree(config_dir(), conf, ignore=shutil.ignore_patterns("local"))
        folder = conf / "preset_caps" / "method" / PRESET
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for method, settings in presets.items():
            (folder / f"{method}.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)


def check_preset_applies(method: str, defaults: dict[str, Any], point: dict[str, Any]) -> None:
    """preset=mini gives the method exactly its config's settings with ``point`` over them; a
    method config that does not pull in its preset file would run the defaults under a name
    that says otherwise."""
    cfg = compose_with_presets({method: point}, [f"method={method}", f"preset={PRESET}"])
    if plain(cfg.method.get("settings")) != defaults | point:
        raise FiaBenchError(
            f"preset={PRESET} does not apply conf/preset_caps/method/{PRESET}/{method}.yaml: add "
            f"'- optional /preset_caps/method@settings: ${{preset}}/{method}' to the defaults "
            f"list of conf/method/{method}.yaml"
        )


def run_overrides(args: argparse.Namespace) -> list[str]:
    """What every run of the sweep is given besides its method and settings."""
    for word in args.overrides:
        key = word.partition("=")[0].lstrip("+~")
        if key in OWN_KEYS or key.startswith("method."):
            raise FiaBenchError(
                f"'{word}': the sweep sets {', '.join(OWN_KEYS)} and the method's settings "
                "itself; use --methods, --model, --task, --seeds and the grid file"
            )
    return [
        f"model={args.model}",
        f"task={args.task}",
        f"seeds={args.seeds}",
        f"evaluator=[{EVALUATOR}]",
        *args.overrides,
    ]


# ---- runs and scores ---------------------------------------------------------------------------
def hydra_value(value: Any) -> str:
    """A grid value as a command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def score(records: pd.DataFrame, runs: pd.DataFrame, candidate: Candidate, reference: str) -> Point:
    """Forget and preserve accuracy and FIA's Overall (H) of the point whose jobs ``runs`` lists
    (besides the reference's), as the report's Overall row computes it: H of each (concept count,
    seed) from that seed's averages, then their mean."""
    import numpy as np

    from fia_bench.composite import fia_overall
    from fia_bench.stats import seed_values

    jobs = runs[runs["method"] != reference]
    label = str(jobs["method"].iloc[0])
    failed = jobs[jobs["status"] != "ok"]
    if len(failed):
        reasons = "; ".join(sorted({str(r) for r in failed["reason"]}))
        return Point(candidate, label, math.nan, math.nan, math.nan, reasons)
    chosen = records[
        (records["method"] == label)
        & (records["evaluator"] == EVALUATOR)
        & (records["metric"] == METRIC)
        & records["role"].isin(["forget", "retain"])
    ]
    seeds = seed_values(chosen).pivot_table(
        index=["n_concepts", "seed"], columns="role", values="value"
    )
    overall = np.asarray(fia_overall(seeds["forget"], seeds["retain"]))
    return Point(
        candidate,
        label,
        float(seeds["forget"].mean()),
        float(seeds["retain"].mean()),
        float(overall.mean()),
    )


def best_point(method: str, points: list[Point]) -> Point:
    """The highest Overall (H). Accuracies move in whole images, so ties are common: H equal to
    six decimals go to the lower ``order``, the method's defaults first, then the grid's order."""
    eligible = [p for p in points if not p.failed and math.isfinite(p.overall)]
    if not eligible:
        raise FiaBenchError(f"every candidate of {method} failed; the first: {points[0].failed}")
    return min(eligible, key=lambda p: (-round(p.overall, 6), p.candidate.order))


# ---- what the sweep writes ---------------------------------------------------------------------
def write_preset(folder: Path, method: str, best: Point, command: str) -> Path:
    """The best point's swept settings (only those), as preset=mini reads them."""
    path = folder / f"{method}.yaml"
    own = " (the method's own settings)" if best.candidate.defaults else ""
    header = (
        f"# preset=mini for {method}: the best point (FIA's Overall (H)) of its sweep on held-out\n"
        f"# classes, {best.label}{own}; every point and the command: docs/mini_presets.md\n"
        f"# written by: {command}\n"
    )
    write_text(path, header + yaml.safe_dump(best.candidate.settings, sort_keys=False))
    return path


def table_block(sweep: MethodSweep, command: str, protocol: str) -> str:
    """The method's section of the doc, between markers that a rerun replaces."""
    keys = list(sweep.points[0].candidate.settings)
    lines = [
        f"<!-- mini_presets:{sweep.method} begin (written by experiments/mini_presets.py) -->",
        f"### {sweep.method}",
        "",
        f"`{command}`",
        "",
        f"{protocol} Best → `{shown(sweep.preset)}`.",
        "",
        "| "
        + " | ".join([*keys, "label in reports", "forget ↓", "preserve ↑", "Overall (H) ↑", ""])
        + " |",
        "|" + "---|" * (len(keys) + 5),
    ]
    for p in sweep.points:
        notes = ["defaults"] if p.candidate.defaults else []
        if p is sweep.best:
            notes.append("**best**")
        if p.failed:
            notes.append(f"failed: {p.failed}")
        numbers = [f"{v:.2f}" if math.isfinite(v) else "—" for v in (p.forget, p.preserve)]
        overall = f"{p.overall:.2f}" if math.isfinite(p.overall) else "—"
        if p is sweep.best:
            overall = f"**{overall}**"
        values = [setting_text(p.candidate.settings[k]) for k in keys]
        row = [*values, f"`{p.label}`", *numbers, overall, ", ".join(notes)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"<!-- mini_presets:{sweep.method} end -->")
    return "\n".join(lines) + "\n"


def write_method_report(
    folder: Path,
    measured: Measured | None,
    from_report: set[str],
    new_runs: list[Path],
    reference: str,
) -> None:
    """The method's sweep report: the points scored from it (``from_report``, by label) and the
    new runs. Any other point it held (no longer in the grid, or measured at another protocol,
    whose new run would share its rows and differ in them) is left out first; with nothing new
    and nothing left out, the report is not rewritten."""
    from fia_bench.report import merge

    held = set(measured.records["method"]) - {reference} if measured else set()
    gone = held - from_report
    if not new_runs and not gone:
        return
    with tempfile.TemporaryDirectory(prefix="mini_presets_report_") as tmp:
        kept = [measured.folder] if measured and from_report else []
        if kept and gone:  # set aside without them first: a new run may share their label
            merge(
                kept,
                Path(tmp),
                drop=sorted(gone),
                grid_prompts=REPORT_GRID_PROMPTS,
                reference=reference,
            )
            kept = [Path(tmp)]
        merge(
            [*kept, *new_runs],
            folder,
            grid_prompts=REPORT_GRID_PROMPTS,
            reference=reference,
            gzip_records=True,
        )


def update_doc(doc: Path, method: str, block: str) -> None:
    """Replace the method's section in ``doc`` (or append it; a new doc gets a title)."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Mini presets\n"
    begin = text.find(f"<!-- mini_presets:{method} begin")
    end_marker = f"<!-- mini_presets:{method} end -->\n"
    end = text.find(end_marker, begin)
    if begin >= 0 and end >= 0:
        text = text[:begin] + block + text[end + len(end_marker) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    write_text(doc, text)


# ---- the sweep ---------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="experiments/mini_presets.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", help="comma-separated (default: every method of the grid)")
    parser.add_argument("--model", default="mini", help="the world's model (default: mini)")
    parser.add_argument("--task", default="objects_heldout", help="the held-out task")
    parser.add_argument("--seeds", type=int, default=3, help="erasure seeds 0..N-1 (default 3)")
    parser.add_argument("--grid", type=Path, default=GRID, help=f"default: {shown(GRID)}")
    parser.add_argument(
        "--out-conf", type=Path, default=OUT_CONF, help=f"preset files ({shown(OUT_CONF)})"
    )
    parser.add_argument("--doc", type=Path, default=DOC, help=f"default: {shown(DOC)}")
    parser.add_argument("--runs", type=Path, default=RUNS, help=f"run folders ({shown(RUNS)})")
    parser.add_argument(
        "--reports",
        type=Path,
        default=REPORTS,
        help=f"each method's report of its points, DIR/<method>/ ({shown(REPORTS)})",
    )
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be at least 1")
    return args


def run_sweep(argv: list[str]) -> dict[str, MethodSweep]:
    """Check everything, then sweep each method and write its preset file and doc section."""
    from fia_bench.cli import check_overrides
    from fia_bench.runner import resolve_splits

    args = parse_args(argv)
    command = shlex.join(["python", "experiments/mini_presets.py", *argv])
    grid = load_grid(args.grid)
    methods = args.methods.split(",") if args.methods else list(grid)
    for method in methods:
        if method not in grid:
            where = f"--methods (the methods of {shown(args.grid)})"
            raise unknown_choice("method", method, grid, where)
    base = run_overrides(args)
    check_overrides(base)
    cfg = fia_bench.compose(base)
    world = str(cfg.model.world)
    task = check_heldout(args.task, world)
    splits = resolve_splits(cfg, task)
    for n, _, retain in splits:
        if not retain:
            raise FiaBenchError(
                f"n_concepts={n} erases every class of task {task.name}: Overall (H) needs "
                f"retained classes; use counts below {len(task.concepts)}"
            )
    reference = str(cfg.reference)
    planned = {}
    for method in methods:
        where = f"methods.{method}"
        try:
            defaults = method_settings(method, where)
            planned[method] = candidates(method, grid[method], defaults, where)
        except FiaBenchError as err:
            raise FiaBenchError(f"{shown(args.grid)}: {err}") from err
        check_preset_applies(method, defaults, planned[method][-1].settings)
    protocol = (
        f"Task `{task.name}` of world `{world}` (`model={args.model}`): "
        f"{', '.join(task.concepts)}; n_concepts {', '.join(str(s[0]) for s in splits)}; "
        f"{args.seeds} seed(s). Forget and preserve: mean {EVALUATOR} accuracy (%) over seeds "
        "and concept counts; H: FIA's Overall, per seed and count, then their mean."
    )
    done = {}
    for method, planned_points in planned.items():
        measured = load_measured(args.reports / method)
        points, new_runs, from_report = [], [], set()
        for candidate in planned_points:
            overrides = [f"method={method}", *base]
            if not candidate.defaults:
                overrides += [
                    f"method.settings.{k}={hydra_value(v)}" for k, v in candidate.settings.items()
                ]
            label = measured.label_of(planned_config(overrides), reference) if measured else None
            if measured and label:
                jobs = measured.runs[measured.runs["method"] == label]
                point, source = score(measured.records, jobs, candidate, reference), "report"
                from_report.add(label)
            else:
                out_dir = args.runs / method / f"{candidate.order:02d}"
                result = fia_bench.run(overrides, out_dir=str(out_dir))
                point, source = score(result.records, result.runs, candidate, reference), "run"
                new_runs.append(out_dir)
            points.append(point)
            print(
                f"[mini_presets] {method} {candidate.order + 1}/{len(planned_points)} "
                f"{point.label}: forget {point.forget:.2f}, preserve {point.preserve:.2f}, "
                f"H {point.overall:.2f}{' (failed)' if point.failed else ''} ({source})",
                flush=True,
            )
        write_method_report(args.reports / method, measured, from_report, new_runs, reference)
        best = best_point(method, points)
        preset = write_preset(args.out_conf, method, best, command)
        sweep = MethodSweep(method, points, best, preset)
        update_doc(args.doc, method, table_block(sweep, command, protocol))
        print(f"[mini_presets] wrote {shown(preset)} ({best.label}) and {shown(args.doc)}")
        done[method] = sweep
    return done


def main(argv: list[str] | None = None) -> int:
    try:
        run_sweep(sys.argv[1:] if argv is None else list(argv))
    except FiaBenchError as err:
        print(f"mini_presets: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
