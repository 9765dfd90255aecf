"""The result schema: one row per measured value, one row per (method, n_concepts, seed) job, and
the completeness check that turns any gap into an error instead of a smaller denominator."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from fia_bench.errors import FiaBenchError

RECORD_COLUMNS = [
    "method",
    "n_concepts",
    "seed",
    "concept",
    "role",
    "prompt_id",
    "prompt",
    "evaluator",
    "metric",
    "value",
    "higher_is_better",
    "image_key",
    "model",
    "task",
    "sampler",
    "protocol",
]
RUN_COLUMNS = [
    "method",
    "n_concepts",
    "seed",
    "status",
    "reason",
    "targets",
    "n_prompts",
    "metrics",
    "erase_key",
    "weights_id",
    "changed_tensors",
    "changed_entries",
    "info",
]
JOB_KEYS = ["method", "n_concepts", "seed"]
ADDED_RECORD_COLUMNS = ("prompt",)  # records written before these were added read them as ""
# Roles are forget / retain / quality / all in every table; records written before the
# vocabulary was one called the forget role "target", and are read with it renamed.
OLD_ROLES = {"target": "forget"}


def ids_digest(prompt_ids: Iterable[Any]) -> str:
    """A short digest of the set of prompt ids a metric is declared for (order-free)."""
    return hashlib.sha256("\n".join(sorted(map(str, prompt_ids))).encode()).hexdigest()[:16]


def declared(name: str, prompt_ids: list[Any]) -> str:
    """The ``evaluator/metric=count@digest`` entry of ``runs.metrics`` for one metric."""
    return f"{name}={len(prompt_ids)}@{ids_digest(prompt_ids)}"


def check_complete(records: pd.DataFrame, runs: pd.DataFrame) -> None:
    """Every successful job must have every declared metric exactly once per declared prompt.

    ``runs.metrics`` lists ``evaluator/metric=count@digest`` entries: the number of prompt rows
    (1 for a set-level metric, the adversarial prompts for an attack) and the digest of their ids,
    so a prompt scored twice where another is missing is caught, not only a short count. Runs
    written before digests were recorded are checked by count and duplicates. Values of a
    metric no successful job declared are refused too.
    """
    problems: list[str] = []
    grouped = {key: frame for key, frame in records.groupby([*JOB_KEYS, "evaluator", "metric"])}
    expected_keys = set()
    for job in runs[runs["status"] == "ok"].itertuples():
        for entry in str(job.metrics).split(";"):
            if not entry:
                continue
            name, _, declaration = entry.rpartition("=")
            count, _, digest = declaration.partition("@")
            evaluator, metric = name.split("/", 1)
            key = (job.method, job.n_concepts, job.seed, evaluator, metric)
            expected_keys.add(key)
            frame = grouped.get(key)
            ids = [] if frame is None else [str(i) for i in frame["prompt_id"]]
            where = f"{job.method} n_concepts={job.n_concepts} seed={job.seed} {evaluator}/{metric}"
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                problems.append(f"{where}: prompt {twice[0]} scored {ids.count(twice[0])} times")
            elif len(ids) != int(count):
                problems.append(f"{where}: {len(ids)} of {count} values")
            elif digest and ids_digest(ids) != digest:
                problems.append(f"{where}: the scored prompts are not the declared ones")
    problems += [
        f"{m} n_concepts={n} seed={s} {e}/{k}: values no successful job declared"
        for m, n, s, e, k in sorted(set(grouped) - expected_keys, key=str)
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise FiaBenchError(f"incomplete results, refusing to aggregate: {shown}")


def fail_non_finite(records: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with their jobs that scored NaN or ±inf anywhere marked failed, naming the value: a
    non-finite score is a failure shown in the report, never a value silently left out of a
    mean (the aggregation then leaves the whole job out, as for a failed erasure)."""
    values = pd.to_numeric(records["value"], errors="coerce").astype(float)
    bad = records[~np.isfinite(values)]
    runs = runs.copy()
    for (method, n, seed), frame in bad.groupby(JOB_KEYS, sort=True):
        first = frame.iloc[0]
        job = (runs["method"] == method) & (runs["n_concepts"] == n) & (runs["seed"] == seed)
        runs.loc[job, "status"] = "failed"
        runs.loc[job, "reason"] = (
            f"non-finite score: {first.evaluator}/{first.metric}={first.value} "
            f"(prompt {first.prompt_id}; {len(frame)} value(s) in all)"
        )
    return runs


def of_successful_jobs(records: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs.loc[runs["status"] == "ok", JOB_KEYS].drop_duplicates()
    return records.merge(ok, on=JOB_KEYS, how="inner")[list(records.columns)]


def check_one_build(runs: list[tuple[str, str, str]]) -> None:
    """Refuse to merge ``(run directory, model name, weight fingerprint)`` runs that measured two
    builds of one model: a retrained model keeps its name, methods and seeds, so its rows would
    otherwise sit beside the old build's in one table without a clash to reveal them."""
    first: dict[str, tuple[str, str]] = {}
    for run_dir, model, weights in runs:
        seen_dir, seen_weights = first.setdefault(model, (run_dir, weights))
        if weights != seen_weights:
            raise FiaBenchError(
                f"runs of model {model!r} loaded different weights: {seen_dir} has "
                f"{seen_weights[:12]}, {run_dir} has {weights[:12]}; merge the runs of one "
                "build (move the other build's run directories out of the way)"
            )


def rule_labels(runs: pd.DataFrame) -> dict[tuple[str, int], str]:
    """(method, n_concepts) → the rule its erasures applied, where a method's info names one
    (``info["rule"]``, e.g. FIA's fusion when ⌈α·C⌉ = 1), so no table shows such a row bare."""
    rules: dict[tuple[str, int], set[str]] = {}
    for job in runs[runs["status"] == "ok"].itertuples():
        info = job.info if isinstance(job.info, str) and job.info else "{}"
        rule = json.loads(info).get("rule")
        if rule:
            rules.setdefault((str(job.method), int(job.n_concepts)), set()).add(str(rule))
    return {key: " / ".join(sorted(found)) for key, found in rules.items()}


def setting_text(value: Any) -> str:
    """A setting's value as a label shows it: as typed on a command line (``lr=1e-05``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, list | tuple):
        return "[" + ",".join(setting_text(v) for v in value) + "]"
    return str(value)


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, the way the command line names them."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out |= flat_settings(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def method_label(name: str, settings: dict[str, Any], defaults: dict[str, Any]) -> str:
    """A method as the records name it: ``uce`` at its defaults, ``uce[lamb=0.1]`` where a
    setting differs, so that runs of one method at several settings (a sweep) are distinct
    methods in every table, CSV and plot. Only changed settings are listed, in the order of the
    method's config (then added keys, sorted)."""
    ours, base = flat_settings(settings), flat_settings(defaults)
    order = [*base, *sorted(set(ours) - set(base))]
    changed = [
        f"{k}={setting_text(ours[k])}" for k in order if k in ours and ours[k] != base.get(k)
    ]
    return f"{name}[{','.join(changed)}]" if changed else name


def registered_name(method: str) -> str:
    """The registry name of a method as the records name it (``uce[lamb=0.1]`` → ``uce``)."""
    return method.partition("[")[0]


def shown_method(method: str, n_concepts: int, labels: dict[tuple[str, int], str]) -> str:
    """The method's name as tables print it: with its rule where it applied one."""
    rule = labels.get((method, int(n_concepts)))
    return f"{method} [{rule}]" if rule else method
