"""A recipe's runs beside the paper's published numbers.

    python -m fia_bench.compare multirun/2026-11-23/10-00-00 [more run dirs] [--out report.md]

Every run of a recipe carries the recipe's ``recipe:`` block in its manifest: which paper CSVs
(``experiments/paper_tables/``) it reproduces, which of our runs give which paper row, and how our
records give each paper metric. The report shows our mean ± std over seeds, the paper's value and
the difference per row, metric and concept, plus the rank agreement of the two; where the paper
used another model or protocol it says so, because then only trends are comparable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from fia_bench import stats
from fia_bench.cache import read_json, write_text
from fia_bench.composite import fia_overall, scapre_uq
from fia_bench.errors import FiaBenchError
from fia_bench.records import (
    OLD_ROLES,
    RUN_COLUMNS,
    check_one_build,
    registered_name,
    rule_labels,
)
from fia_bench.report import markdown_table, records_path
from fia_bench.resources import shipped

PAPER_TABLES = shipped("experiments/paper_tables")
SD_VERSIONS = {"sd14": "SD v1.4", "sd15": "SD v1.5"}
COMPOSITES = ("fia_overall", "scapre_uq", "mean_rank")
COUNT = "count/"


# ---- composite scores the papers print ---------------------------------------------------------
def mean_rank(table: pd.DataFrame, lower: list[str], higher: list[str]) -> pd.Series:
    """FIA's art "Rank": each method's rank on every metric (1 = best, ties averaged) among the
    table's rows, averaged over the metrics (methods.md §2.7, Table 4)."""
    ranks = [table[m].rank(method="average") for m in lower]
    ranks += [table[m].rank(method="average", ascending=False) for m in higher]
    return pd.concat(ranks, axis=1).mean(axis=1)


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    records: pd.DataFrame
    weights: str  # the model's weight fingerprint: which build of a model the run measured
    jobs: pd.DataFrame  # runs.csv: one row per erasure job, with the method's info


def find_runs(paths: list[Path]) -> list[Run]:
    """Run directories at or below the given paths (a multirun sweep holds one per job)."""
    dirs = sorted(
        {
            m.parent
            for p in paths
            for m in [p / "manifest.json", *p.rglob("*/manifest.json")]
            if m.is_file() and records_path(m.parent).is_file()
        }
    )
    if not dirs:
        raise FiaBenchError(f"no fia_bench run directory (manifest.json + records.csv) in {paths}")
    runs = []
    for d in dirs:
        records = pd.read_csv(
            records_path(d),
            keep_default_na=False,
            na_values=[""],
            dtype={"prompt_id": str, "image_key": str, "concept": str},
        )
        records["role"] = records["role"].replace(OLD_ROLES)
        manifest = read_json(d / "manifest.json")
        if "merged_runs" in manifest:
            raise FiaBenchError(
                f"{d} is a merged report (python -m fia_bench.report --out), not a run; "
                f"compare the {len(manifest['merged_runs'])} run directories its manifest's "
                "merged_runs lists"
            )
        jobs = (
            pd.read_csv(d / "runs.csv", keep_default_na=False, na_values=[])
            if (d / "runs.csv").is_file()
            else pd.DataFrame(columns=RUN_COLUMNS)
        )
        runs.append(Run(d, manifest["config"], records, manifest["inputs"]["model_weights"], jobs))
    check_one_build(
        [(str(r.path), m, r.weights) for r in runs for m in r.records["model"].unique()]
    )
    return runs


def recipe_of(runs: list[Run]) -> dict[str, Any]:
    recipes = {str((r.config.get("recipe") or {}).get("name")) for r in runs}
    if recipes == {"None"}:
        raise FiaBenchError(
            "these runs were not made by a recipe: run one with experiment=<recipe>"
        )
    if len(recipes) > 1:
        raise FiaBenchError(
            f"runs of several recipes given ({', '.join(sorted(recipes))}); compare one"
        )
    recipe = runs[0].config["recipe"]
    check_recipe(recipe)
    return recipe


RECIPE_KEYS = ("name", "paper", "rows", "metrics")
METRIC_KEYS = {
    "name",
    "paper_metric",
    "paper_label",
    "source",
    "role",
    "per",
    "classes",
    "reduce",
    "scale",
    "complement",
    "digits",
    "composite",
    "forget",
    "preserve",
    "clip",
    "lower",
    "higher",
}
ROLES = ("forget", "retain", "quality", "all")


def check_recipe(recipe: Any) -> None:
    """The ``recipe:`` block's shape, checked before any run is read (and by the recipe tests)."""
    where = f"recipe {recipe.get('name') if isinstance(recipe, dict) else recipe!r}"
    if not isinstance(recipe, dict) or any(k not in recipe for k in RECIPE_KEYS):
        raise FiaBenchError(f"{where}: needs {', '.join(RECIPE_KEYS)}")
    for row in recipe["rows"]:
        if not isinstance(row, dict) or "method" not in row or "paper" not in row:
            raise FiaBenchError(f"{where}: every row needs 'paper' (a label or null) and 'method'")
    names = []
    for spec in recipe["metrics"]:
        if not isinstance(spec, dict) or "name" not in spec:
            raise FiaBenchError(f"{where}: metrics must be a list of entries with a 'name'")
        unknown = sorted(set(spec) - METRIC_KEYS)
        if unknown:
            raise FiaBenchError(f"{where}: metric {spec['name']} has unknown keys {unknown}")
        kind = spec.get("composite")
        if kind is not None:
            needs = {
                "fia_overall": ("forget", "preserve"),
                "scapre_uq": ("forget", "clip"),
                "mean_rank": ("lower", "higher"),
            }.get(kind)
            if needs is None:
                raise FiaBenchError(f"{where}: composite {kind} is not one of {COMPOSITES}")
            given = [spec.get(k) for k in needs]
            inputs = [str(v) for g in given for v in (g if isinstance(g, list) else [g])]
            if any(g is None for g in given) or any(i not in names for i in inputs):
                raise FiaBenchError(
                    f"{where}: composite {spec['name']} needs {', '.join(needs)} naming "
                    "metrics listed before it"
                )
        elif "/" not in str(spec.get("source", "")) or spec.get("role") not in ROLES:
            raise FiaBenchError(
                f"{where}: metric {spec['name']} needs source 'evaluator/metric' and a role "
                f"({', '.join(ROLES)})"
            )
        elif spec.get("reduce", "mean") not in ("mean", "sum") or spec.get("per") not in (
            None,
            "concept",
            "class",
        ):
            raise FiaBenchError(
                f"{where}: metric {spec['name']}: reduce is mean or sum, per is concept or class"
            )
        names.append(str(spec["name"]))


def load_paper(names: list[str], tables: Path = PAPER_TABLES) -> pd.DataFrame:
    frames = []
    for name in names:
        path = tables / name
        if not path.is_file():
            raise FiaBenchError(f"recipe names paper table {name}, which is not in {tables}")
        frames.append(pd.read_csv(path, keep_default_na=False))
    return pd.concat(frames, ignore_index=True)


def concept_key(label: str) -> str:
    """Paper labels carry a role prefix in some tables ("forget: tench", "keep: church")."""
    return " ".join(label.split(": ", 1)[-1].lower().split())


# ---- our values --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    label: str
    paper: str | None
    paper_row: str | None
    method: str
    settings: dict[str, Any]
    n_concepts: int | None
    follows: str | None  # the official run (script, settings) this row reproduces


def rows_of(recipe: dict[str, Any]) -> list[Row]:
    return [
        Row(
            label=str(r.get("label") or r.get("row") or r.get("paper") or r["method"]),
            paper=r.get("paper"),
            paper_row=r.get("row"),
            method=str(r["method"]),
            settings=dict(r.get("settings") or {}),
            n_concepts=r.get("n_concepts"),
            follows=r.get("follows"),
        )
        for r in recipe["rows"]
    ]


def row_records(row: Row, runs: list[Run]) -> pd.DataFrame | None:
    """The records of the run that made this row: its method with these settings. The unedited
    reference is measured by every run; the first run's copy is used."""
    found = row_run(row, runs)
    if found is None:
        return None
    records = found.records
    # a run's own method is named by its label (fia[alpha=0.1]); the reference by its name
    own = found.config["method"]["name"] == row.method != str(found.config.get("reference"))
    named = records["method"].map(registered_name) if own else records["method"]
    records = records[named == row.method]
    if row.n_concepts is not None:
        records = records[records["n_concepts"] == int(row.n_concepts)]
    counts = sorted(records["n_concepts"].unique())
    if len(counts) > 1:
        raise FiaBenchError(
            f"row '{row.label}': the run has n_concepts {counts}; give the row n_concepts"
        )
    return records


def row_label(row: Row, runs: list[Run]) -> str:
    """The row's label as printed: with the rule its erasure applied where the method names one
    (FIA's fusion when ⌈α·C⌉ = 1), so a single-concept row never reads as plain Eq. 8."""
    found, records = row_run(row, runs), row_records(row, runs)
    if found is None or records is None or records.empty:
        return row.label
    method = str(records["method"].iloc[0])
    rule = rule_labels(found.jobs).get((method, int(records["n_concepts"].iloc[0])))
    return f"{row.label} [{rule}]" if rule else row.label


def row_run(row: Row, runs: list[Run]) -> Run | None:
    """The run that made this row (see ``row_records``)."""

    def matches(run: Run) -> bool:
        if run.config["method"]["name"] == row.method:
            settings = run.config["method"].get("settings") or {}
            return all(settings.get(k) == v for k, v in row.settings.items())
        return str(run.config.get("reference")) == row.method and not row.settings

    found = [r for r in runs if matches(r)]
    if not found:
        return None
    if len(found) > 1 and any(r.config["method"]["name"] == row.method for r in found):
        own = [r for r in found if r.config["method"]["name"] == row.method]
        if len(own) > 1:
            raise FiaBenchError(
                f"row '{row.label}': several runs match ({', '.join(str(r.path) for r in own)}); "
                "give the row the settings that tell them apart"
            )
        found = own
    return found[0]


def seed_values(records: pd.DataFrame, spec: dict[str, Any], per: str | None) -> pd.DataFrame:
    """One value per seed (and per concept or detector class): the mean over prompt rows, or
    the sum over images for detection counts; then the metric's complement and scale."""
    evaluator, _, metric = str(spec["source"]).partition("/")
    picked = records[(records["evaluator"] == evaluator) & (records["role"] == spec["role"])]
    if metric == "count":
        picked = picked[picked["metric"].str.startswith(COUNT)]
    else:
        picked = picked[picked["metric"] == metric]
    keys = ["seed"] + (["concept"] if per == "concept" else ["metric"] if per == "class" else [])
    reduce = str(spec.get("reduce", "mean"))
    values = picked.assign(value=picked["value"].astype(float)).groupby(keys)["value"].agg(reduce)
    values = values.reset_index()
    if spec.get("complement"):
        values["value"] = 100.0 - values["value"]
    values["value"] *= float(spec.get("scale", 1.0))
    if per == "class":
        values["concept"] = values["metric"].str.removeprefix(COUNT)
    return values


def summarize(values: pd.DataFrame) -> tuple[float, float, int]:
    v = values["value"].astype(float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


# ---- the comparison ----------------------------------------------------------------------------
@dataclass
class Cell:
    row: str
    concept: str
    mean: float
    std: float
    n: int
    paper: float | None


def paper_value(
    paper: pd.DataFrame, spec: dict[str, Any], name: str, row: Row, label: str | None = None
) -> float | None:
    """The paper's value for ``row`` of the metric ``spec`` describes: a concept or class cell
    (``label``), the row's own label (ablations), or the metric's ``paper_label``."""
    if row.paper is None:
        return None
    metric = str(spec.get("paper_metric", name))
    hit = paper[(paper["metric"] == metric) & (paper["method"] == row.paper)]
    if label is not None:
        hit = hit[hit["concept_or_row"].map(concept_key) == concept_key(label)]
    elif row.paper_row is not None:
        hit = hit[hit["concept_or_row"] == row.paper_row]
    elif spec.get("paper_label") is not None:
        hit = hit[hit["concept_or_row"] == spec["paper_label"]]
    if len(hit) > 1:
        raise FiaBenchError(
            f"paper tables have {len(hit)} values of {metric} for row '{row.label}': "
            "give the metric a paper_label"
        )
    return float(hit["value"].iloc[0]) if len(hit) else None


def metric_cells(
    name: str,
    spec: dict[str, Any],
    rows: list[Row],
    records: dict[str, pd.DataFrame | None],
    per_seed: dict[str, dict[str, pd.DataFrame]],
    paper: pd.DataFrame,
    labels: dict[str, str],
) -> list[Cell]:
    """Cells of one paper metric; ``per_seed`` keeps every row's seed values for composites."""
    per = spec.get("per")
    ours_to_paper = {str(v).lower(): k for k, v in (spec.get("classes") or labels).items()}
    in_paper = paper.loc[paper["metric"] == spec.get("paper_metric", name), "concept_or_row"]
    order = {c: i for i, c in enumerate(dict.fromkeys(concept_key(c) for c in in_paper))}
    cells = []
    for row in rows:
        recs = records[row.label]
        if recs is None:
            continue
        values = seed_values(recs, spec, per)
        if values.empty:  # e.g. no retain concepts when every concept is erased
            continue
        per_seed[name][row.label] = values
        if per is None:
            cells.append(
                Cell(row.label, "", *summarize(values), paper_value(paper, spec, name, row))
            )
            continue
        found = []
        for concept, group in values.groupby("concept"):
            label = ours_to_paper.get(str(concept).lower(), str(concept))
            same = concept_key(label) == concept_key(str(concept))
            shown = label if same or per == "class" else f"{label} ↔ {concept}"
            cell = Cell(
                row.label, shown, *summarize(group), paper_value(paper, spec, name, row, label)
            )
            found.append((order.get(concept_key(label), len(order)), shown, cell))
        cells += [cell for *_, cell in sorted(found, key=lambda f: f[:2])]
    return cells


def composite_cells(
    name: str,
    spec: dict[str, Any],
    rows: list[Row],
    per_seed: dict[str, dict[str, pd.DataFrame]],
    paper: pd.DataFrame,
    reference: str,
) -> list[Cell]:
    """FIA overall per seed; UQ and mean rank per seed across the rows of this table."""
    kind = spec["composite"]
    inputs = (
        [spec["forget"], spec["preserve"]]
        if kind == "fia_overall"
        else [spec["forget"], spec["clip"]]
        if kind == "scapre_uq"
        else [*spec["lower"], *spec["higher"]]
    )
    wide = {}
    for row in rows:
        if kind == "mean_rank" and row.method == reference:
            continue
        parts = [per_seed[m].get(row.label) for m in inputs]
        if any(p is None for p in parts):
            continue
        wide[row.label] = pd.concat(
            [p.set_index("seed")["value"].rename(m) for p, m in zip(parts, inputs, strict=True)],
            axis=1,
        )
    if not wide:
        return []
    table = pd.concat(wide, names=["row", "seed"]).dropna()
    if kind == "fia_overall":
        score = pd.Series(fia_overall(table[inputs[0]], table[inputs[1]]), index=table.index)
    else:
        score = pd.concat(
            [
                scapre_uq(t[inputs[0]], t[inputs[1]])
                if kind == "scapre_uq"
                else mean_rank(t, list(spec["lower"]), list(spec["higher"]))
                for _, t in table.groupby(level="seed")
            ]
        )
    by_row = {r.label: r for r in rows}
    cells = []
    for label, values in score.groupby(level="row", sort=False):
        frame = values.rename("value").reset_index()
        cells.append(
            Cell(label, "", *summarize(frame), paper_value(paper, spec, name, by_row[label]))
        )
    return cells


def shown_path(path: Path) -> str:
    """Relative to the working directory where possible, so committed reports name no home."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4g}"


def agreement(cells: list[Cell]) -> str:
    both = [(c.mean, c.paper) for c in cells if c.paper is not None and not np.isnan(c.mean)]
    if len(both) < 3 or len({p for _, p in both}) < 2 or len({m for m, _ in both}) < 2:
        return ""
    rho = sps.spearmanr([m for m, _ in both], [p for _, p in both]).statistic
    return f"rank agreement with the paper over {len(both)} cells: Spearman ρ = {rho:.2f}"


@dataclass
class Section:
    """One paper metric: its cells, how ours is measured, and how to print it."""

    name: str
    arrow: str
    source: str
    digits: int
    cells: list[Cell]


def sections(runs: list[Run], recipe: dict[str, Any], paper: pd.DataFrame) -> list[Section]:
    """Every metric of the recipe, in its order, ours beside the paper's."""
    rows = rows_of(recipe)
    records = {row.label: row_records(row, runs) for row in rows}
    reference = str(runs[0].config.get("reference", "none"))
    labels = dict(recipe.get("concepts") or {})
    per_seed: dict[str, dict[str, pd.DataFrame]] = {}
    out = []
    for spec in recipe["metrics"]:
        name = str(spec["name"])
        per_seed[name] = {}
        if spec.get("composite") is not None:
            cells = composite_cells(name, spec, rows, per_seed, paper, reference)
        else:
            cells = metric_cells(name, spec, rows, records, per_seed, paper, labels)
        direction = paper.loc[paper["metric"] == spec.get("paper_metric", name), "direction"]
        arrow = {"lower_better": " ↓", "higher_better": " ↑"}.get(
            direction.iloc[0] if len(direction) else "", ""
        )
        source = spec.get("composite") or source_label(spec)
        out.append(Section(name, arrow, str(source), int(spec.get("digits", 2)), cells))
    return out


def source_label(spec: dict[str, Any]) -> str:
    """How our column is read off the records, in the order ``seed_values`` applies it: a
    complement or a scale changes what the column means, so the header says so."""
    label = str(spec["source"])
    if str(spec.get("reduce", "mean")) != "mean":
        label = f"{spec['reduce']} of {label}"
    scale = float(spec.get("scale", 1.0))
    if spec.get("complement"):
        label = f"100 − {label}" if scale == 1.0 else f"(100 − {label})"
    if scale != 1.0:
        label = f"{label} × {scale:g}"
    return f"{label} ({spec['role']})"


def notes_of(runs: list[Run], recipe: dict[str, Any], paper: pd.DataFrame) -> list[str]:
    """Why the numbers may differ: another model, the recipe's protocol notes, rows not run."""
    ours_model = ", ".join(sorted(runs[0].records["model"].unique()))
    notes = []
    paper_models = sorted(paper["model"].unique())
    ours_label = SD_VERSIONS.get(ours_model)
    if ours_label is None or any(not m.startswith(ours_label) for m in paper_models):
        stated = " / ".join(paper_models)
        theirs = f"on {stated}"
        if all(m.startswith("not stated") for m in paper_models):
            hints = " / ".join(m for m in paper_models if m != "not stated")
            theirs = "on a model the paper does not state" + (f" ({hints})" if hints else "")
        notes.append(
            f"The paper's numbers are {theirs}; ours are on `{ours_model}`: "
            "compare trends (orderings, rank agreement), not values."
        )
    notes += [str(n) for n in recipe.get("notes") or []]
    notes += [f"{r.label} follows {r.follows}." for r in rows_of(recipe) if r.follows]
    not_run = [r.label for r in rows_of(recipe) if row_records(r, runs) is None]
    if not_run:
        notes.append(f"Rows not run (no run directory matches them): {', '.join(not_run)}.")
    return notes


def compare(paths: list[Path], tables: Path = PAPER_TABLES) -> str:
    """The comparison report (Markdown) of a recipe's run directories."""
    runs = find_runs(paths)
    recipe = recipe_of(runs)
    paper = load_paper(list(recipe["paper"]), tables)
    first = runs[0].records
    lines = [
        f"# {recipe['name']}: {recipe.get('title', '')}",
        "",
        f"Paper tables: {', '.join(recipe['paper'])} (`experiments/paper_tables/`); "
        f"recipe follows {recipe.get('spec', 'the specs')}.",
        f"Ours: model `{', '.join(sorted(first['model'].unique()))}` "
        f"(weights {', '.join(sorted({f'`{r.weights[:12]}`' for r in runs}))}) · "
        f"task `{', '.join(sorted(first['task'].unique()))}` · "
        f"sampler `{', '.join(sorted(first['sampler'].unique()))}` · "
        f"seeds {sorted(int(s) for s in first['seed'].unique())} · {len(runs)} run(s).",
        "",
        "Values: ours = mean ± sample std over seeds (number of seeds); Δ = ours − paper.",
        "",
        "## Notes",
        "",
        *(f"- {n}" for n in notes_of(runs, recipe, paper)),
        "",
    ]
    shown = {row.label: row_label(row, runs) for row in rows_of(recipe)}
    for section in sections(runs, recipe, paper):
        header = ["row", "concept", "ours", "paper", "Δ"]
        body = [
            [
                shown.get(c.row, c.row),
                c.concept,
                f"{stats.format_mean_std(c.mean, c.std, section.digits)} ({c.n})",
                fmt(c.paper),
                fmt(c.mean - c.paper) if c.paper is not None else "—",
            ]
            for c in section.cells
        ]
        if not any(c.concept for c in section.cells):
            header, body = header[:1] + header[2:], [b[:1] + b[2:] for b in body]
        title = f"## {section.name}{section.arrow} · ours: {section.source}"
        lines += [title, "", markdown_table(header, body), ""]
        if agreement(section.cells):
            lines += [agreement(section.cells), ""]
    lines.append(f"Run directories: {', '.join(f'`{shown_path(r.path)}`' for r in runs)}")
    return "\n".join(lines) + "\n"


def report_cli(
    prog: str, description: str, build: Callable[[list[Path]], str], argv: list[str] | None
) -> int:
    """The command line of a Markdown report made from run directories: print it, and with
    ``--out`` also write it; a bad input is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("runs", nargs="+", type=Path, help="run or multirun sweep directories")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    args = parser.parse_args(argv)
    try:
        text = build(args.runs)
    except FiaBenchError as err:
        print(f"{prog.removeprefix('python -m ')}: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        write_text(args.out, text)
    print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    return report_cli(
        "python -m fia_bench.compare",
        "A recipe's runs beside the paper's published numbers.",
        compare,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
