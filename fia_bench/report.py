"""Tables, plots, image grids and the manifest of a run, and the merge of several runs.

    python -m fia_bench.report RUN_DIR [RUN_DIR ...] [--out DIR]

A report is a pure function of the records, so a re-run that recomputes nothing writes
byte-identical tables; timings live only in ``manifest.json``."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from fia_bench import stats
from fia_bench.cache import Cache, atomic_write, read_json, write_json, write_text
from fia_bench.composite import fia_overall
from fia_bench.detection import FLAGGED
from fia_bench.errors import FiaBenchError, crash_line, unknown_choice
from fia_bench.loggers import log_run
from fia_bench.records import (
    ADDED_RECORD_COLUMNS,
    JOB_KEYS,
    OLD_ROLES,
    RECORD_COLUMNS,
    RUN_COLUMNS,
    check_complete,
    check_one_build,
    fail_non_finite,
    flat_settings,
    of_successful_jobs,
    registered_name,
    rule_labels,
    setting_text,
    shown_method,
)
from fia_bench.resources import checkout_root
from fia_bench.tasks import load_task

PACKAGES = (
    "fia_bench",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "open_clip_torch",
    "numpy",
    "pandas",
    "scipy",
    "hydra-core",
    "safetensors",
)
COUNT = "count/"  # per-image detection counts of one class, e.g. count/FEMALE_BREAST_EXPOSED
OVERALL = "**Overall (H)**"
OVERALL_NOTE = (
    "Overall (H): FIA's overall score, the harmonic mean of the retain accuracy and 100 − the "
    "forget accuracy, 2·R·(100 − F) / (R + 100 − F), per seed from that seed's averages, then "
    "mean ± std over seeds; 100 is every forget concept gone and every retain concept kept."
)
SEED_STATS = ["mean", "std", "count"]  # over seeds: a cell's value, spread and seed count


# ---- tables --------------------------------------------------------------------------------
def cell(mean: float, std: float, n_seeds: int, planned: int) -> str:
    """mean ± std; a cell holding fewer seeds than the sweep ran (a job failed) says how many."""
    text = stats.format_mean_std(mean, std)
    return f"{text} (n={int(n_seeds)})" if n_seeds < planned and not pd.isna(mean) else text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def latex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    def esc(text: str) -> str:
        return (
            text.replace("\\", r"\textbackslash{}")
            .replace("&", r"\&")
            .replace("%", r"\%")
            .replace("_", r"\_")
            .replace("#", r"\#")
            .replace("±", r"$\pm$")
        )

    body = [" & ".join(esc(c) for c in header) + r" \\", r"\midrule"]
    body += [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
    return "\n".join(
        [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{esc(caption)}}}",
            r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}",
            r"\toprule",
            *body,
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
            "",
        ]
    )


def concept_tables(
    records: pd.DataFrame,
    methods: list[str],
    planned: dict[int, int],
    labels: dict[tuple[str, int], str] | None = None,
) -> list[tuple[str, list[str], list[list[str]]]]:
    """Paper layout per (n_concepts, per-prompt metric): one row per concept, one column per
    method (named with the rule it applied, ``labels`` from ``rule_labels``), then the average
    forget and retain rows. ``planned``: seeds run per concept count. A metric measured only on
    concept-free prompts (``quality``: captions that name no concept) has no concept rows; its
    values are in the summary, not in an empty table here."""
    per_prompt = records[
        records["role"].isin(["forget", "retain"]) & ~records["metric"].str.startswith(COUNT)
    ]
    units = stats.paired_units(per_prompt)
    tables = []
    for (n, evaluator, metric), frame in units.groupby(["n_concepts", "evaluator", "metric"]):
        per_concept = frame.groupby(["method", "concept", "role"])["value"].agg(SEED_STATS)
        order = {c: i for i, c in enumerate(records["concept"].unique())}  # the task's order
        forgotten = sorted(frame.loc[frame["role"] == "forget", "concept"].unique(), key=order.get)
        retained = sorted(frame.loc[frame["role"] == "retain", "concept"].unique(), key=order.get)
        rows = []
        for role, concepts in (("forget", forgotten), ("retain", retained)):
            for concept in concepts:
                cells = []
                for m in methods:
                    key = (m, concept, role)
                    cells.append(
                        cell(*per_concept.loc[key], planned[n]) if key in per_concept.index else "—"
                    )
                rows.append([f"{concept} ({role})", *cells])
        seeds = stats.seed_values(
            records[
                (records["n_concepts"] == n)
                & (records["evaluator"] == evaluator)
                & (records["metric"] == metric)
            ]
        )
        for role in ("forget", "retain"):
            avg = seeds[seeds["role"] == role].groupby("method")["value"].agg(SEED_STATS)
            if not avg.empty:
                rows.append(
                    [
                        f"**Avg {role}**",
                        *(
                            cell(*avg.loc[m], planned[n]) if m in avg.index else "—"
                            for m in methods
                        ),
                    ]
                )
        if metric == "accuracy" and {"forget", "retain"} <= set(seeds["role"]):
            # FIA's overall score, per seed from that seed's averages, then over seeds
            wide = seeds.pivot_table(index=["method", "seed"], columns="role", values="value")
            overall = pd.Series(fia_overall(wide["forget"], wide["retain"]), index=wide.index)
            agg = overall.groupby("method").agg(SEED_STATS)
            rows.append(
                [
                    OVERALL,
                    *(cell(*agg.loc[m], planned[n]) if m in agg.index else "—" for m in methods),
                ]
            )
        tables.append(
            (
                f"n_concepts={n} · {evaluator}/{metric} (mean ± std over seeds)",
                ["concept", *(shown_method(m, n, labels or {}) for m in methods)],
                rows,
            )
        )
    return tables


def count_tables(
    records: pd.DataFrame,
    methods: list[str],
    planned: dict[int, int],
    labels: dict[tuple[str, int], str] | None = None,
) -> list[tuple[str, list[str], list[list[str]]]]:
    """Detector layout (NudeNet-style tables): per-image ``count/<class>`` values summed over the
    image set of each seed, one row per class plus the total, mean ± std over seeds."""
    counts = records[records["metric"].str.startswith(COUNT)]
    tables = []
    for (n, evaluator), frame in counts.groupby(["n_concepts", "evaluator"]):
        per_seed = frame.groupby(["method", "metric", "seed"])["value"].sum().reset_index()
        total = per_seed.groupby(["method", "seed"])["value"].sum().reset_index()
        total["metric"] = "total"
        stats_by = pd.concat([per_seed, total]).groupby(["method", "metric"])["value"]
        agg = stats_by.agg(SEED_STATS)
        classes = [*sorted(frame["metric"].unique()), "total"]
        rows = [
            [
                c.removeprefix(COUNT),
                *(
                    cell(*agg.loc[(m, c)], planned[n]) if (m, c) in agg.index else "—"
                    for m in methods
                ),
            ]
            for c in classes
        ]
        tables.append(
            (
                f"n_concepts={n} · {evaluator}: detections per class (sum over images)",
                ["class", *(shown_method(m, n, labels or {}) for m in methods)],
                rows,
            )
        )
    return tables


def summary_rows(
    summary: pd.DataFrame, labels: dict[tuple[str, int], str]
) -> tuple[list[str], list[list[str]]]:
    header = ["method", "n_concepts", "evaluator/metric", "role", "mean ± std", "seeds", "n"]
    rows = [
        [
            shown_method(r.method, r.n_concepts, labels),
            str(r.n_concepts),
            f"{r.evaluator}/{r.metric}",
            r.role,
            stats.format_mean_std(r.mean, r.std),
            str(r.n_seeds),
            str(r.n_samples),
        ]
        for r in summary.itertuples()
    ]
    return header, rows


def test_rows(tests: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = [
        "n",
        "evaluator/metric",
        "role",
        "A vs B",
        "pairs",
        "mean diff",
        "W",
        "p",
        "p (Holm)",
        "effect r",
        "test",
        "warning",
    ]

    def num(x: float, fmt: str = ".4g") -> str:
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    rows = [
        [
            str(r.n_concepts),
            f"{r.evaluator}/{r.metric}",
            r.role,
            f"{r.method_a} vs {r.method_b}",
            str(r.n_pairs),
            num(r.mean_diff, ".3f"),
            num(r.statistic),
            num(r.p_value),
            num(r.p_holm),
            num(r.effect_size, ".3f"),
            str(r.method_p),
            str(r.warning),
        ]
        for r in tests.itertuples()
    ]
    return header, rows


# ---- figures -------------------------------------------------------------------------------
# One colour per method in every report, so a method reads the same across figures and papers;
# settings of one method (a sweep: uce, uce[lamb=0.1]) share it and differ in marker.
METHOD_COLOURS = {
    "none": "#4d4d4d",
    "fia": "#1f77b4",
    "uce": "#ff7f0e",
    "scapre": "#2ca02c",
    "esd": "#d62728",
    "dynamic_mask": "#9467bd",
    "conceptprune": "#8c564b",
    "mace": "#e377c2",
    "speed": "#bcbd22",
    "rece": "#17becf",
    "ac": "#393b79",
    "fmn": "#ad494a",
    "salun": "#637939",
    "checkpoint": "#7b4173",
}
PLUGIN_COLOURS = ("#8c6d31", "#5254a3", "#843c39", "#d6616b", "#6b6ecf", "#b5cf6b", "#e7969c")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def method_colour(method: str) -> str:
    """The fixed colour of a method (by registry name); another plugin's is picked by a hash of
    its name, so it too keeps one colour from report to report."""
    name = registered_name(method)
    if name in METHOD_COLOURS:
        return METHOD_COLOURS[name]
    return PLUGIN_COLOURS[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(PLUGIN_COLOURS)]


def method_markers(methods: list[str]) -> dict[str, str]:
    """A marker per label: the settings of one method in the order the report lists them."""
    seen: dict[str, int] = {}
    out = {}
    for m in methods:
        rank = seen[registered_name(m)] = seen.get(registered_name(m), -1) + 1
        out[m] = MARKERS[rank % len(MARKERS)]
    return out


# Axis label (with unit) and value range of each metric the shipped evaluators emit; error bars
# are clipped to the range (a mean ± std of percentages never draws below 0 or above 100).
METRIC_SCALES: dict[str, tuple[str, float, float]] = {
    "accuracy": ("accuracy (%)", 0.0, 100.0),
    "asr": ("attack success rate (%)", 0.0, 100.0),
    "pre_asr": ("success before the attack (%)", 0.0, 100.0),
    "fsr": ("forgetting success rate (%)", 0.0, 100.0),
    FLAGGED: ("images flagged (%)", 0.0, 100.0),
    "clip_score": ("CLIP score (100 × cosine)", 0.0, 100.0),
    "clip_a": ("CLIP_a (100 × cosine)", -100.0, 100.0),
    "fid": ("FID (feature distance)", 0.0, math.inf),
    "fid_torchmetrics": ("FID, torchmetrics (feature distance)", 0.0, math.inf),
}


def metric_scale(metric: str) -> tuple[str, float, float]:
    """(axis label, low, high) of a metric; detection counts are per image, an unknown metric
    is labelled by its name and unbounded."""
    if metric.startswith(COUNT):
        return f"{metric.removeprefix(COUNT)} detections per image", 0.0, math.inf
    return METRIC_SCALES.get(metric, (metric, -math.inf, math.inf))


def clipped_errors(mean: pd.Series, std: pd.Series, metric: str) -> np.ndarray:
    """Asymmetric error bars of mean ± std that stop at the metric's range."""
    _, low, high = metric_scale(metric)
    mean, std = mean.to_numpy(float), std.fillna(0).to_numpy(float)
    return np.vstack([np.minimum(std, mean - low), np.minimum(std, high - mean)]).clip(min=0)


ROLE_ORDER = ("forget", "retain", "quality", "all")  # forget panels first


def ordered_roles(roles: Any) -> list[str]:
    return sorted(set(roles), key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else 99)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(
        path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    )
    plt.close(fig)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_label(method: str, width: int = 40) -> str:
    """A method's label broken after its name's bracket and its settings' commas: a swept setting
    list can run past a panel's width (the figure's layout then gives up rather than fit it) or
    a grid column's (where a cut label hides the setting that tells two columns apart)."""
    spaced = method.replace("[", "[ ").replace(",", ", ")
    return textwrap.fill(spaced, width).replace("[ ", "[").replace(", ", ",")


def metrics_figure(summary: pd.DataFrame, methods: list[str]) -> Any:
    """Each metric against the number of erased concepts: one row of panels per metric, its
    forget panel left of its retain panel; ``methods`` in the tables' order."""
    plt = pyplot()
    metrics = list(summary.groupby(["evaluator", "metric"]).groups)
    roles = ordered_roles(summary["role"])
    markers = method_markers(methods)
    fig, axes = plt.subplots(
        len(metrics), len(roles), figsize=(4.2 * len(roles), 3.2 * len(metrics)), squeeze=False
    )
    for i, (evaluator, metric) in enumerate(metrics):
        for j, role in enumerate(roles):
            ax = axes[i][j]
            frame = summary[
                (summary["evaluator"] == evaluator)
                & (summary["metric"] == metric)
                & (summary["role"] == role)
            ]
            if frame.empty:
                ax.axis("off")
                continue
            for method in [m for m in methods if m in set(frame["method"])]:
                line = frame[frame["method"] == method].sort_values("n_concepts")
                ax.errorbar(
                    line["n_concepts"],
                    line["mean"],
                    yerr=clipped_errors(line["mean"], line["std"], metric),
                    marker=markers[method],
                    color=method_colour(method),
                    capsize=3,
                    label=figure_label(method),
                )
            ax.set_xticks(sorted(frame["n_concepts"].unique()))
            ax.set_title(f"{evaluator}/{metric} ({role})", fontsize=9)
            ax.set_xlabel("concepts erased")
            ax.set_ylabel(metric_scale(metric)[0], fontsize=8)
            ax.legend(fontsize=7)
    return fig


def sweeps(methods: list[str]) -> bool:
    """Whether a method appears at several settings (``uce`` and ``uce[lamb=0.1]``)."""
    names = [registered_name(m) for m in methods]
    return len(set(names)) < len(names)


def tradeoff_figure(summary: pd.DataFrame, methods: list[str]) -> Any:
    """Forget against retain, one panel per (n_concepts, evaluator/metric) measured on both,
    one labelled point per method and setting with its std over seeds on both axes."""
    plt = pyplot()
    wide = summary[summary["role"].isin(["forget", "retain"])].pivot_table(
        index=["n_concepts", "evaluator", "metric", "method"],
        columns="role",
        values=["mean", "std"],
        dropna=False,
    )
    wide = wide.dropna(subset=[("mean", "forget"), ("mean", "retain")])
    panels = list(wide.groupby(level=["n_concepts", "evaluator", "metric"]))
    markers = method_markers(methods)
    cols = max(1, min(3, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for ax, ((n, evaluator, metric), frame) in zip(axes.flat, panels, strict=False):
        frame = frame.droplevel(["n_concepts", "evaluator", "metric"])
        for method in [m for m in methods if m in frame.index]:
            row = frame.loc[[method]]
            x, y = row[("mean", "forget")], row[("mean", "retain")]
            ax.errorbar(
                x,
                y,
                xerr=clipped_errors(x, row[("std", "forget")], metric),
                yerr=clipped_errors(y, row[("std", "retain")], metric),
                marker=markers[method],
                color=method_colour(method),
                capsize=3,
                linestyle="none",
            )
            ax.annotate(
                figure_label(method),
                (x.iloc[0], y.iloc[0]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        label = metric_scale(metric)[0]
        ax.set_title(f"n_concepts={n} · {evaluator}/{metric}", fontsize=9)
        ax.set_xlabel(f"forget: {label}", fontsize=8)
        ax.set_ylabel(f"retain: {label}", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return fig


GridRow = tuple[int, str, str, str, str]  # (n_concepts, role, concept, prompt_id, prompt)


def grid_rows(records: pd.DataFrame, order: list[str], per_count: int) -> list[GridRow]:
    """The grid's rows: for every concept count, the first prompt of each concept, forget
    concepts first, then retain (each in the task's ``order``), at most ``per_count`` of them."""
    images = records[(records["image_key"] != "") & records["role"].isin(["forget", "retain"])]
    rank = {c: i for i, c in enumerate(order)}
    rows: list[GridRow] = []
    for n, frame in images.groupby("n_concepts", sort=True):
        first = frame.drop_duplicates("concept").assign(
            role_rank=frame["role"].map({"forget": 0, "retain": 1}),
            concept_rank=frame["concept"].map(lambda c: rank.get(c, len(rank))),
        )
        first = first.sort_values(["role_rank", "concept_rank", "prompt_id"], kind="mergesort")
        rows += [
            (int(n), str(r.role), str(r.concept), str(r.prompt_id), str(r.prompt or ""))
            for r in first.head(per_count).itertuples()
        ]
    return rows


GRID_TILE, GRID_LABEL_W, GRID_BLOCK_H = 96, 240, 20
# a column header: characters to a line (what fits a tile), pixels a line, pixels around them
GRID_HEAD_CHARS, GRID_LINE_H, GRID_HEAD_PAD = 15, 12, 12


# a report's copies of the images its grid shows, named <image key>.png; a name no output
# folder has by chance, since a rewrite removes the PNGs in it that the grid no longer shows
REPORT_IMAGES = "grid_images"


class ImageSources:
    """Where a report finds an image by its key: the ``grid_images/`` folders of the merged
    reports among its inputs, then the caches of the runs it merges. A report keeps there the
    images its grid shows, so that merging it on a machine without the old runs' caches keeps
    its grid whole and unchanged (an image generated again, on another thread count, may differ
    from the one shown in a pixel or two)."""

    def __init__(self, caches: Iterable[Cache] = (), folders: Iterable[Path] = ()) -> None:
        self.caches, self.folders = list(caches), list(folders)

    def find(self, key: str) -> Path | None:
        paths = [f / f"{key}.png" for f in self.folders]
        paths += [c.path("images", key, ".png") for c in self.caches]
        return next((p for p in paths if p.is_file()), None)


def image_grid(
    records: pd.DataFrame, sources: ImageSources, path: Path, per_count: int, order: list[str]
) -> dict[str, Path]:
    """Prompts (rows) × methods (columns) at the first seed, a block of rows per concept count;
    each row is labelled with its role and its prompt's text (``grid_rows``). Returns the image
    shown in each tile, by key; a tile whose image is found nowhere stays blank, and is counted
    in one line on stderr."""
    from PIL import Image, ImageDraw

    rows = grid_rows(records, order, per_count)
    if not rows:
        return {}
    images = records[(records["image_key"] != "") & (records["seed"] == records["seed"].min())]
    methods = sorted(images["method"].unique(), key=lambda m: (m != "none", m))
    keys = images.drop_duplicates(["method", "n_concepts", "prompt_id"]).set_index(
        ["method", "n_concepts", "prompt_id"]
    )["image_key"]
    counts = sorted({n for n, *_ in rows})
    tile = GRID_TILE
    width = GRID_LABEL_W + tile * len(methods)
    headers = [figure_label(method, GRID_HEAD_CHARS) for method in methods]
    head_h = GRID_HEAD_PAD + GRID_LINE_H * max(h.count("\n") + 1 for h in headers)
    grid = Image.new(
        "RGB", (width, head_h + GRID_BLOCK_H * len(counts) + tile * len(rows)), "white"
    )
    draw = ImageDraw.Draw(grid)
    shown: dict[str, Path] = {}
    blank: list[str] = []
    for j, header in enumerate(headers):
        draw.multiline_text((GRID_LABEL_W + j * tile + 4, 6), header, fill="black", spacing=2)
    y = head_h
    for n in counts:
        draw.rectangle((0, y, width, y + GRID_BLOCK_H - 1), fill="#e8e8e8")
        draw.text((4, y + 4), f"n_concepts={n}", fill="black")
        y += GRID_BLOCK_H
        for _, role, concept, prompt_id, prompt in [r for r in rows if r[0] == n]:
            lines = [f"{role}: {concept}", *textwrap.wrap(prompt or prompt_id, 38)]
            draw.multiline_text((4, y + 6), "\n".join(lines[:6]), fill="black", spacing=2)
            for j, method in enumerate(methods):
                if (method, n, prompt_id) not in keys.index:
                    continue  # the method has no image of this prompt: nothing to show
                key = keys[(method, n, prompt_id)]
                found = sources.find(key)
                img = grid_tile(found, tile) if found else None
                if img is None:  # missing or damaged: its tile stays blank
                    blank.append(key)
                    continue
                grid.paste(img, (GRID_LABEL_W + j * tile, y))
                shown[key] = found
            y += tile
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    if blank:
        print(
            f"fia_bench.report: {path}: {len(blank)} of {len(blank) + len(shown)} tiles blank, "
            f"their images in no run's cache nor merged report's {REPORT_IMAGES}/ "
            f"(first: {blank[0]})",
            file=sys.stderr,
        )
    return shown


def grid_tile(path: Path, tile: int) -> Any:
    """The image at ``path`` as a ``tile`` × ``tile`` RGB tile, or None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB").resize((tile, tile), Image.NEAREST)
    except (OSError, SyntaxError):
        return None


def keep_grid_images(folder: Path, shown: dict[str, Path]) -> None:
    """Copy the images a grid shows into a report's ``grid_images/`` folder, each at most a tile's
    size (the grid shows no more, and Stable Diffusion's 512 px images would weigh a report
    down), and remove those it no longer shows."""
    from PIL import Image

    if not shown and not folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for key, source in shown.items():
        target = folder / f"{key}.png"
        if target.exists() and target.resolve() == source.resolve():
            continue
        with Image.open(source) as img:
            small = (
                img
                if max(img.size) <= GRID_TILE
                else img.resize((GRID_TILE, GRID_TILE), Image.NEAREST)
            )
            atomic_write(target, lambda tmp, small=small: small.save(tmp, format="PNG"))
    for stale in folder.glob("*.png"):
        if stale.stem not in shown:
            stale.unlink()


# ---- provenance ----------------------------------------------------------------------------
def git_state() -> dict[str, Any]:
    """The checkout's commit; an installed wheel has none (its version is in ``versions``), and
    asking git from site-packages would name whatever repository holds the venv."""
    root = checkout_root()
    if root is None:
        return {"commit": None, "dirty": None}

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ---- writing -------------------------------------------------------------------------------
PLOT, GRID, TRADEOFF = "metrics_vs_n.png", "grid.png", "tradeoff.png"
FIGURES = {
    PLOT: "metrics against the number of erased concepts",
    GRID: "prompts × methods",
    TRADEOFF: "forget against retain, one point per method and setting",
}


# A run directory's per-prompt values; a published report may keep them gzipped (RECORDS_GZ),
# because results-mini's reach tens of MB as plain CSV and are committed each time they grow.
RECORDS, RECORDS_GZ = "records.csv", "records.csv.gz"


def records_path(run_dir: Path) -> Path:
    """Where a run directory or report keeps its records: gzipped if it was written so."""
    packed = run_dir / RECORDS_GZ
    return packed if packed.is_file() else run_dir / RECORDS


def write_records(out_dir: Path, records: pd.DataFrame, gzipped: bool) -> None:
    """``records.csv``, or ``records.csv.gz``, byte-identical for unchanged records; the other
    form is removed, so a folder never holds both."""
    if gzipped:

        def write(tmp: Path) -> None:
            # no file name or time in the gzip header: they would differ between writes
            with (
                open(tmp, "wb") as raw,
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed,
            ):
                packed.write(records.to_csv(index=False).encode("utf-8"))

        atomic_write(out_dir / RECORDS_GZ, write)
    else:
        write_text(out_dir / RECORDS, records.to_csv(index=False))
    (out_dir / (RECORDS if gzipped else RECORDS_GZ)).unlink(missing_ok=True)


def write_report(
    out_dir: Path,
    records: pd.DataFrame,
    runs: pd.DataFrame,
    images: ImageSources,
    alpha: float,
    grid_prompts: int,
    reference: str = "none",
    weights: list[str] | None = None,
    concepts: list[str] | None = None,
    gzip_records: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``weights``: the fingerprints of the models the runs loaded, printed under the title so
    that a report tells which build of a model (the mini world is retrained) it measured.
    ``concepts``: the task's concept order (``concept_order``); by default the records'."""
    runs = fail_non_finite(records, runs)
    measured = records  # every value, failures included, goes into records.csv
    records = of_successful_jobs(records, runs)
    check_complete(records, runs)
    summary = stats.summarize(records)
    tests = stats.wilcoxon_tests(records, reference=reference, alpha=alpha)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_records(out_dir, measured, gzip_records)
    write_text(out_dir / "runs.csv", runs.to_csv(index=False))
    write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    write_text(out_dir / "tests.csv", tests.to_csv(index=False))

    methods = sorted(records["method"].unique(), key=lambda m: (m != reference, m))
    md = ["# fia_bench report", ""]
    meta = records[["model", "task", "sampler"]].drop_duplicates()
    md += [
        f"model `{r.model}` · task `{r.task}` · sampler `{r.sampler}`" for r in meta.itertuples()
    ]
    if weights:
        md += ["", "model weights " + ", ".join(f"`{w[:12]}`" for w in sorted(set(weights)))]
    protocols = records[["evaluator", "protocol"]].drop_duplicates()
    md += ["", *(f"- `{r.evaluator}`: {r.protocol}" for r in protocols.itertuples()), ""]
    tex = []
    labels = rule_labels(runs)
    planned = runs.groupby("n_concepts")["seed"].nunique().to_dict()
    tables = [
        *concept_tables(records, methods, planned, labels),
        *count_tables(records, methods, planned, labels),
    ]
    for title, header, rows in tables:
        md += [f"## {title}", "", markdown_table(header, rows), ""]
        if any(r[0] == OVERALL for r in rows):
            md += [OVERALL_NOTE, ""]
        tex.append(latex_table(header, [[c.replace("**", "") for c in r] for r in rows], title))
    header, rows = summary_rows(summary, labels)
    md += ["## Summary (mean ± sample std over seeds)", "", markdown_table(header, rows), ""]
    header, rows = test_rows(tests)
    md += [
        f"## Wilcoxon signed-rank tests (paired over concept × seed, Holm within each "
        f"n/metric/role, α = {alpha})",
        "",
        markdown_table(header, rows),
        "",
    ]
    small = tests[tests["warning"] != ""]
    if len(small):
        md += [
            f"> **Warning**: {len(small)} of the {len(tests)} comparisons above cannot reach "
            f"p < {alpha} (too few pairs that differ: the table's pairs column counts every "
            "pair, the warning those with a non-zero difference) or have no pairs; see the "
            "warning column. Add seeds or concepts.",
            "",
        ]
    failed = runs[runs["status"] != "ok"]
    if len(failed):
        md += [
            "## Failed runs",
            "",
            markdown_table(
                ["method", "n_concepts", "seed", "reason"],
                [[r.method, str(r.n_concepts), str(r.seed), r.reason] for r in failed.itertuples()],
            ),
            "",
        ]
    figures = [PLOT, GRID, *([TRADEOFF] if sweeps(methods) and not summary.empty else [])]
    md += [f"![{FIGURES[name]}]({name})\n" for name in figures]
    write_text(out_dir / "report.md", "\n".join(md))
    write_text(out_dir / "report.tex", "\n".join(tex))
    if not summary.empty:
        save_figure(metrics_figure(summary, methods), out_dir / PLOT)
    if TRADEOFF in figures:
        save_figure(tradeoff_figure(summary, methods), out_dir / TRADEOFF)
    order = concepts or list(dict.fromkeys(records["concept"]))
    shown = image_grid(records, images, out_dir / GRID, grid_prompts, order)
    keep_grid_images(out_dir / REPORT_IMAGES, shown)
    return summary, tests


def relocated(markdown: str, out_dir: Path, target: Path) -> str:
    """The report's text for a file at ``target``: figure links point into ``out_dir``."""
    prefix = Path(os.path.relpath(out_dir.resolve(), target.resolve().parent)).as_posix()
    if prefix == ".":
        return markdown
    for name in FIGURES:
        markdown = markdown.replace(f"]({name})", f"]({prefix}/{name})")
    return markdown


def write_run(
    out_dir: Path,
    cfg: Any,
    records: pd.DataFrame,
    runs: pd.DataFrame,
    counts: dict[str, Any],
    inputs: dict[str, Any],
    details: list[dict[str, Any]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    from omegaconf import OmegaConf

    summary, tests = write_report(
        out_dir,
        records,
        runs,
        ImageSources([Cache(cfg.cache_dir)]),
        float(cfg.report.alpha),
        int(cfg.report.grid_prompts),
        str(cfg.reference),
        [inputs["model_weights"]],
        concept_order(records, {str(out_dir): cfg}),
    )
    if details:
        lines = [json.dumps(d, sort_keys=True, default=str) for d in details]
        write_text(out_dir / "details.jsonl", "\n".join(lines) + "\n")
    write_json(
        out_dir / "manifest.json",
        {
            "command": sys.argv,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "versions": versions(),
            "git": git_state(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "inputs": inputs,
            "counts": counts,
            "seeds": sorted(set(int(s) for s in runs["seed"])),
        },
    )
    log_run(cfg, out_dir, summary, tests)
    return summary, tests


# ---- merging -------------------------------------------------------------------------------
def load_runs(
    dirs: list[Path],
) -> tuple[pd.DataFrame, pd.DataFrame, ImageSources, dict, dict[str, str]]:
    """Concatenate run directories; rows measured by several runs (the shared reference) must
    agree within rounding and are kept once (``one_measurement``), and each model must be one
    build. Also returns where their
    images are, each run's configuration and model weights. A merged report is a run directory
    too: its rows keep the run they came from (its records' ``run_dir``) and its grid's images,
    so a report grows by merging it with new runs, on a machine that never had the old ones."""
    records, runs, caches, configs, builds = [], [], [], {}, []
    for d in dirs:
        for path in (records_path(d), d / "runs.csv", d / "manifest.json"):
            if not path.is_file():
                raise FiaBenchError(f"{d} is not a fia_bench run directory (no {path.name})")
        frame = read_run_table(
            records_path(d),
            RECORD_COLUMNS,
            na_values=[""],
            dtype={"prompt_id": str, "prompt": str, "image_key": str, "run_dir": str, "model": str},
            added=(*ADDED_RECORD_COLUMNS, "run_dir"),
        )
        frame["model"] = frame["model"].fillna("")
        merged_configs, model_weights = read_manifest(d / "manifest.json", str(d), frame)
        frame["run_dir"] = frame["run_dir"].fillna("").replace("", str(d))
        unknown = sorted(set(frame["run_dir"]) - set(merged_configs))
        if unknown:
            raise FiaBenchError(
                f"{records_path(d)}: rows of run {unknown[0]}, which its manifest does not list"
            )
        records.append(frame)
        runs.append(read_run_table(d / "runs.csv", RUN_COLUMNS, na_values=[]))
        configs |= merged_configs
        caches += [Cache(config["cache_dir"]) for config in merged_configs.values()]
        builds += [(str(d), model, model_weights[model]) for model in frame["model"].unique()]
    check_one_build(builds)
    weights = {model: w for _, model, w in builds}  # one build per model, checked
    merged = pd.concat(records, ignore_index=True)[[*RECORD_COLUMNS, "run_dir"]]
    merged[["image_key", "prompt"]] = merged[["image_key", "prompt"]].fillna("")
    merged["role"] = merged["role"].replace(OLD_ROLES)
    # a prompt's text is its id's: rows of an older run (no text) are the same rows
    key = [
        c for c in RECORD_COLUMNS if c not in ("value", "higher_is_better", "image_key", "prompt")
    ]
    merged = one_measurement(merged.drop_duplicates([*key, "value"]), key, configs)
    all_runs = pd.concat(runs, ignore_index=True)[RUN_COLUMNS].drop_duplicates(JOB_KEYS)
    images = ImageSources(caches, [d / REPORT_IMAGES for d in dirs if (d / REPORT_IMAGES).is_dir()])
    return merged.reset_index(drop=True), all_runs.reset_index(drop=True), images, configs, weights


# How far a row measured again (the shared reference, on another machine or thread count) may
# move and still be the same measurement, as a share of its metric's largest magnitude among the
# rows measured again: CPU rounding differs with the thread count, and generation and scoring
# amplify it (clip_score moved by up to 0.0092, 2.5e-4 of its 36.4, between two builds of the
# mini world's reference on one and two threads, docs/results_mini_notes.md). Another protocol
# moves some row by far more; an accuracy that flips, by all of its range.
REMEASURED_RTOL = 1e-3


def one_measurement(records: pd.DataFrame, key: list[str], configs: dict[str, Any]) -> pd.DataFrame:
    """One row per key: where runs measured a row again, the first run's value is kept if the
    others agree within rounding (``REMEASURED_RTOL`` of the metric's scale, said in one line),
    and the merge is refused, naming the config keys the runs differ in, if they do not."""
    again = records.duplicated(key, keep=False)
    if not again.any():
        return records
    shared = records[again]
    first = shared.groupby(key, dropna=False, sort=False)["value"].transform("first")
    scale = shared["value"].abs().groupby([shared["evaluator"], shared["metric"]]).transform("max")
    moved = (shared["value"] - first).abs()
    close = (moved <= REMEASURED_RTOL * scale) | (shared["value"].isna() & first.isna())
    if not close.all():
        r = shared[~close].iloc[0]
        group = shared.groupby(key, dropna=False, sort=False).ngroup()
        runs = shared.loc[group == group[~close].iloc[0], "run_dir"]
        first_run, other = runs.iloc[0], r.run_dir
        raise FiaBenchError(
            f"runs disagree on {r.method} n_concepts={r.n_concepts} seed={r.seed} "
            f"{r.evaluator}/{r.metric} {r.prompt_id}: {first_run} and {other} differ in "
            f"{protocol_difference(configs[first_run], configs[other])}; merge runs of one "
            "protocol"
        )
    later = shared.duplicated(key)
    print(
        f"fia_bench.report: {int(later.sum())} rows measured again by a later run "
        f"(first: {shared.loc[later, 'run_dir'].iloc[0]}) agree with the first within rounding "
        f"(largest difference {moved[later].max():.3g}, tolerance {REMEASURED_RTOL:g} of each "
        "metric's largest value); the first run's values are kept",
        file=sys.stderr,
    )
    return records.drop_duplicates(key)


def drop_methods(
    records: pd.DataFrame,
    runs: pd.DataFrame,
    configs: dict[str, Any],
    names: list[str],
    reference: str,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The merge without the named methods' rows and jobs, and without the runs that then have
    no row left: how a published report drops a column that a rerun at new settings replaces,
    on a machine that has only the report."""
    for name in names:
        if name == reference:
            raise FiaBenchError(
                f"--drop-method {name}: it is the reference the tests compare against; "
                "choose another --reference to drop it"
            )
        if name not in set(records["method"]):
            raise unknown_choice("method", name, records["method"].unique(), "the merged runs")
    records = records[~records["method"].isin(names)].reset_index(drop=True)
    runs = runs[~runs["method"].isin(names)].reset_index(drop=True)
    kept = set(records["run_dir"])
    return records, runs, {run: config for run, config in configs.items() if run in kept}


# where runs may differ and still share rows: the method (its own column), where they write
RUN_PLACE_KEYS = ("method", "out_dir", "cache_dir", "hydra", "logger", "report", "recipe")


def protocol_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The config keys, beyond the method and where the runs wrote, in which two runs differ:
    none means they measured under one protocol."""
    flat_a, flat_b = (
        {k: v for k, v in flat_settings(c).items() if k.split(".")[0] not in RUN_PLACE_KEYS}
        for c in (a, b)
    )
    return sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k) != flat_b.get(k))


def protocol_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``protocol_keys`` as a message, e.g. ``sampler.steps (2 vs 4)``: what made two runs
    measure one row differently."""
    keys = protocol_keys(a, b)
    if not keys:
        return "no config key (another code or package version measured them)"
    flat_a, flat_b = flat_settings(a), flat_settings(b)
    shown = ", ".join(
        f"{k} ({setting_text(flat_a.get(k))} vs {setting_text(flat_b.get(k))})" for k in keys[:3]
    )
    return shown + (f" and {len(keys) - 3} more keys" if len(keys) > 3 else "")


def concept_order(records: pd.DataFrame, configs: dict[str, Any]) -> list[str]:
    """The concepts in their task's order (the task file's list, which the tables follow), then
    any concept no task file lists in the order the runs wrote them."""
    listed: list[str] = []
    for config in configs.values():
        try:
            listed += load_task(str(config["task"]["name"]), str(config["model"]["world"])).concepts
        except (FiaBenchError, KeyError, TypeError):
            continue
    return list(dict.fromkeys([*listed, *map(str, records["concept"])]))


def run_directories(paths: list[Path]) -> list[Path]:
    """The run directories among the arguments: files are skipped with a note (a shell glob
    over a Hydra sweep folder, ``<sweep>/*``, also matches its ``multirun.yaml``); every
    directory must be a run directory."""
    skipped = [p for p in paths if p.is_file()]
    if skipped:
        names = ", ".join(str(p) for p in skipped)
        print(f"fia_bench.report: skipped {names} (files, not run directories)", file=sys.stderr)
    dirs = [p for p in paths if not p.is_file()]
    if not dirs:
        raise FiaBenchError("no run directory given (only files); pass <sweep dir>/* or run dirs")
    return dirs


INTEGER_COLUMNS = ("n_concepts", "seed")


def read_run_table(
    path: Path, columns: list[str], added: tuple[str, ...] = (), **options: Any
) -> pd.DataFrame:
    """A run's CSV table with its columns and their types checked: a damaged or hand-edited file
    ends in one line naming the file, the row and what is wrong, never in a pandas trace.
    ``added``: columns newer than some runs, read as empty where a table lacks them."""
    try:
        frame = pd.read_csv(path, keep_default_na=False, **options)
    except (
        UnicodeDecodeError,
        ValueError,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        gzip.BadGzipFile,  # a damaged records.csv.gz
        EOFError,  # a truncated one
        zlib.error,
    ) as err:
        raise FiaBenchError(f"{path}: not a readable CSV table ({str(err).strip()})") from err
    for column in added:
        if column not in frame.columns:
            frame[column] = ""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise FiaBenchError(f"{path}: missing column(s) {', '.join(missing)}")
    numeric = [*INTEGER_COLUMNS, "value"] if "value" in columns else list(INTEGER_COLUMNS)
    for column in numeric:
        values = pd.to_numeric(frame[column], errors="coerce")
        blank = frame[column].isna() | (frame[column].astype(str) == "")
        wrong = values.isna() & ~(blank & (column == "value"))
        if column in INTEGER_COLUMNS:
            wrong |= ~np.isfinite(values.fillna(0)) | (values.fillna(0) % 1 != 0)
            wrong |= (values.abs() >= 2**62) & values.notna()
        if wrong.any():
            row = int(np.flatnonzero(wrong.to_numpy())[0])
            kind = "an integer" if column in INTEGER_COLUMNS else "a number"
            raise FiaBenchError(
                f"{path}:{row + 2}: {column}={str(frame[column].iloc[row])!r} is not {kind}"
            )
        frame[column] = values.astype(int) if column in INTEGER_COLUMNS else values.astype(float)
    if "higher_is_better" in columns:
        flags = frame["higher_is_better"].astype(str)
        wrong = ~flags.isin(["True", "False"])
        if wrong.any():
            row = int(np.flatnonzero(wrong.to_numpy())[0])
            raise FiaBenchError(
                f"{path}:{row + 2}: higher_is_better={flags.iloc[row]!r} is not True or False"
            )
        frame["higher_is_better"] = flags == "True"
    return frame


def read_manifest(
    path: Path, run_dir: str, records: pd.DataFrame
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({run directory: resolved config}, {model: weights fingerprint}) of a run's manifest, or
    of a merged report's (every run it merged, and the one build of each model it holds)."""
    try:
        manifest = read_json(path)
        if "merged_runs" in manifest:
            if "model_weights" not in manifest or records["run_dir"].fillna("").eq("").any():
                raise FiaBenchError(
                    f"{path}: a report merged before reports recorded their runs and builds; "
                    "merge the run directories its merged_runs lists instead"
                )
            configs, weights = dict(manifest["merged_runs"]), dict(manifest["model_weights"])
        else:
            configs = {run_dir: manifest["config"]}
            weights = dict.fromkeys(records["model"].unique(), manifest["inputs"]["model_weights"])
        for config in configs.values():
            str(config["cache_dir"])
        missing = sorted(set(records["model"]) - set(weights))
        if missing:
            raise KeyError(f"model_weights of {missing[0]}")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FiaBenchError(f"{path}: not JSON ({err})") from err
    except (KeyError, TypeError) as err:
        raise FiaBenchError(f"{path}: not a fia_bench manifest (no {err})") from err
    return configs, {str(k): str(v) for k, v in weights.items()}


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors in the one-line form of every other bad input."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def merge(
    dirs: list[Path],
    out: Path,
    *,
    drop: Iterable[str] = (),
    alpha: float = 0.05,
    grid_prompts: int = 12,
    reference: str = "none",
    gzip_records: bool = False,
) -> None:
    """Merge run directories and reports into the report at ``out`` (``main``'s work, for
    scripts that build a report of their own runs); ``drop``: methods to leave out."""
    records, runs, images, configs, weights = load_runs(dirs)
    records, runs, configs = drop_methods(records, runs, configs, list(drop), reference)
    order = concept_order(records, configs)
    rank = {c: i for i, c in enumerate(order)}
    records = (
        records.assign(concept_rank=records["concept"].map(rank))
        .sort_values(
            ["method", "n_concepts", "seed", "evaluator", "metric", "concept_rank", "prompt_id"],
            kind="mergesort",
        )
        .drop(columns="concept_rank")
        .reset_index(drop=True)
    )
    runs = runs.sort_values(JOB_KEYS, kind="mergesort").reset_index(drop=True)
    write_report(
        out,
        records,
        runs,
        images,
        alpha,
        grid_prompts,
        reference,
        list(weights.values()),
        order,
        gzip_records,
    )
    write_json(
        out / "manifest.json",
        {
            "merged_runs": configs,
            "model_weights": weights,
            "versions": versions(),
            "git": git_state(),
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m fia_bench.report",
        description="Merge fia_bench run directories into one report.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with records.csv)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument(
        "--grid-prompts", type=int, default=12, help="image grid rows per concept count"
    )
    parser.add_argument("--reference", default="none")
    parser.add_argument(
        "--gzip-records",
        action="store_true",
        help="write records.csv.gz instead of records.csv (a report to commit; reads back alike)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the report's markdown here, its figure links pointing into --out",
    )
    parser.add_argument(
        "--drop-method",
        action="append",
        default=[],
        metavar="NAME",
        help="leave out a method's column as the tables name it, e.g. 'esd[lr=0.0003]' "
        "(a row its rerun replaces); repeatable",
    )
    args = parser.parse_args(argv)
    if not (0 < args.alpha < 1):
        parser.error(f"--alpha {args.alpha}: must be a number > 0 and < 1")
    if args.grid_prompts < 0:
        parser.error(f"--grid-prompts {args.grid_prompts}: must be an integer >= 0")
    try:
        merge(
            run_directories(args.runs),
            args.out,
            drop=args.drop_method,
            alpha=args.alpha,
            grid_prompts=args.grid_prompts,
            reference=args.reference,
            gzip_records=args.gzip_records,
        )
    except FiaBenchError as err:
        print(f"fia_bench.report: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        print(f"fia_bench.report: {crash_line(err, args.out)}", file=sys.stderr)
        return 1
    text = (args.out / "report.md").read_text(encoding="utf-8")
    if args.markdown:
        write_text(args.markdown, relocated(text, args.out, args.markdown))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
