"""One invocation: validate the config, sweep (n_concepts × seeds × [reference, method]) through
the cached stages, check completeness, aggregate and write the report. Returns DataFrames so
notebooks get the same results as the command line."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from fia_bench import distributed, report
from fia_bench.api import (
    PROMPT_COLUMNS,
    Attack,
    EvalContext,
    Evaluator,
    Method,
    PromptDataset,
    Task,
)
from fia_bench.cache import Cache, stable_hash
from fia_bench.engine import Engine, EngineOptions, Sampler
from fia_bench.erasures import Job
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.models import load_model, prepared_model, torch_dtype
from fia_bench.progress import progress
from fia_bench.records import RECORD_COLUMNS, RUN_COLUMNS, declared, method_label
from fia_bench.registry import ATTACKS, DATASETS, EVALUATORS, METHODS
from fia_bench.stages import SEED_STRIDE, Stages, info_json
from fia_bench.tasks import load_task, world_vocabulary
from fia_bench.validate import check_config, plain, selected_evaluators


@dataclass
class RunResult:
    out_dir: Path
    records: pd.DataFrame
    runs: pd.DataFrame
    summary: pd.DataFrame
    tests: pd.DataFrame
    counts: dict[str, Any]


def resolve_seeds(value: Any) -> list[int]:
    """``N`` → seeds 0..N-1, a list → itself (``validate.check_config`` checked both)."""
    return list(range(value)) if isinstance(value, int) else [int(s) for s in value]


def resolve_splits(
    cfg: DictConfig, task: Task
) -> list[tuple[int, tuple[str, ...], tuple[str, ...]]]:
    """(n_concepts, targets, retain) for each requested concept count, in the task's order.
    ``retain=[...]`` narrows every count's retain set to the listed concepts it does not erase."""
    kept = task_concepts(cfg.get("retain"), task, "retain")
    if cfg.get("concepts"):
        targets = task_concepts(cfg.concepts, task, "concepts")
        if kept is not None and set(kept) & set(targets):
            raise FiaBenchError(
                f"retain={list(kept)}: {sorted(set(kept) & set(targets))} also in concepts=; "
                "a concept is either erased or retained"
            )
        return [(len(targets), targets, narrowed(task, targets, kept))]
    raw = cfg.n_concepts
    counts = [raw] if isinstance(raw, int) else list(raw or [])
    if not counts:
        raise FiaBenchError("n_concepts is empty: give an int or a list such as [1,5,10]")
    splits = []
    for n in sorted(set(int(c) for c in counts)):
        if not 1 <= n <= len(task.concepts):
            raise FiaBenchError(
                f"n_concepts={n}: task '{task.name}' of world '{task.world}' "
                f"has {len(task.concepts)} concepts; use 1..{len(task.concepts)}"
            )
        targets, _ = task.split(n)
        splits.append((n, targets, narrowed(task, targets, kept)))
    return splits


def task_concepts(listed: Any, task: Task, key: str) -> tuple[str, ...] | None:
    """``concepts=`` or ``retain=`` checked against the task: each a concept of it, none twice."""
    if not listed:
        return None
    concepts = tuple(str(c) for c in listed)
    for concept in concepts:
        if concept not in task.concepts:
            raise unknown_choice(
                f"concept for task '{task.name}' of world '{task.world}'",
                concept,
                task.concepts,
                f"{key}=",
            )
    if len(set(concepts)) != len(concepts):
        raise FiaBenchError(f"{key}={list(concepts)}: a concept is listed twice")
    return concepts


def narrowed(task: Task, targets: tuple[str, ...], kept: tuple[str, ...] | None) -> tuple[str, ...]:
    """The task's concepts not erased, in the task's order; only ``kept`` ones when given."""
    return tuple(c for c in task.concepts if c not in targets and (kept is None or c in kept))


def build_dataset(node: DictConfig, where: str, cache: Cache) -> PromptDataset:
    # its settings were checked against the dataset's SETTINGS before anything loaded
    dataset = DATASETS.get(str(node.dataset), f"{where}.dataset")(**plain(node.get("settings")))
    dataset.cache = cache
    return dataset


def build_evaluators(cfg: DictConfig, context: EvalContext) -> dict[str, Evaluator]:
    selected = selected_evaluators(cfg)
    if not selected:
        raise FiaBenchError(f"no evaluator selected; valid: {', '.join(EVALUATORS.names())}")
    out = {}
    for name, node in selected.items():
        settings = node.get("settings") or {}
        out[name] = EVALUATORS.get(name, "evaluator=")(context=context, settings=settings)
        out[name].roles = list(node.get("roles") or [])
    return out


def run(
    cfg: DictConfig, method: Method | None = None, pipeline: Any = None, preset: str | None = None
) -> RunResult:
    """One job; under ``torchrun``/``accelerate launch`` each process runs it as one rank of a
    sharded run (``distributed.py``). ``method`` and ``pipeline`` are objects from Python (see
    ``fia_bench.run``) that replace the configured method and model weights. ``preset``: the
    preset the config was composed with (a ``preset_kind: caps`` preset's caps count as the
    method's defaults)."""
    with distributed.session(str(cfg.device)):
        return run_job(cfg, method, pipeline, preset)


def default_settings(name: str, preset: str | None) -> dict[str, Any]:
    """A method's settings as its own config gives them, with the run's preset: what a run's
    settings are compared with to name it (``records.method_label``)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = [f"method={name}", *([f"preset={preset}"] if preset else [])]
    try:
        if GlobalHydra.instance().is_initialized():  # inside the command line's Hydra app
            from hydra import compose

            cfg = compose(config_name="config", overrides=overrides)
        else:
            import fia_bench

            cfg = fia_bench.compose(overrides)
    except HydraException:  # a method without a config file: every setting is shown
        return {}
    return plain(cfg.method.get("settings"))


def label_defaults(cfg: DictConfig, preset: str | None) -> dict[str, Any]:
    """What a run's label names its changed settings against: the method's config, with the
    preset's values only when the preset just caps budgets (``preset_kind: caps``); a tuned
    preset's values are changes the label shows."""
    capped_by = preset if cfg.get("preset_kind") == "caps" else None
    return default_settings(str(cfg.method.name), capped_by)


def instance_identity(method: Method) -> dict[str, Any]:
    """What the erase cache keys a Method object by: its class and its attributes (as text), so
    two objects configured differently never share an edit."""
    cls = type(method)
    state = {k: repr(v) for k, v in sorted(vars(method).items())}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "state": state}


def run_job(
    cfg: DictConfig, method: Method | None = None, pipeline: Any = None, preset: str | None = None
) -> RunResult:
    started = time.perf_counter()
    check_config(cfg)
    out_dir = Path(cfg.out_dir)
    seeds = resolve_seeds(cfg.seeds)
    task = load_task(str(cfg.task.name), str(cfg.model.world))
    splits = resolve_splits(cfg, task)
    cache = Cache(cfg.cache_dir)
    datasets = {
        key: build_dataset(cfg.task[key], f"task.{key}", cache)
        for key in ("prompts", "quality")
        if cfg.task.get(key)
    }
    sampler = Sampler.from_config(cfg.sampler)
    dtype = torch_dtype(cfg.precision)
    method_settings = plain(cfg.method.get("settings"))
    instances = {}
    if method is not None:
        method_name = shown = type(method).__name__.lower()
        method_settings = instance_identity(method)
        instances[method_name] = method
    else:
        method_name = str(cfg.method.name)
        shown = method_label(method_name, method_settings, label_defaults(cfg, preset))
    methods = {str(cfg.reference): {}} | {method_name: method_settings}
    labels = {str(cfg.reference): str(cfg.reference), method_name: shown}
    for name in methods:
        if name not in instances:
            METHODS.get(name, "method=")
    # every split's prompt rows before the model loads: a bad prompt file fails in seconds
    prompt_sets = {
        n: pd.concat(
            [
                check_prompt_rows(d.rows(task, targets, retain), f"task.{key}")
                for key, d in datasets.items()
            ],
            ignore_index=True,
        )
        for n, targets, retain in splits
    }

    if pipeline is not None:
        model = prepared_model(pipeline, cfg.model, cfg.device, cfg.precision)
    else:
        model = load_model(cfg.model, world_vocabulary(task.world), cfg.device, cfg.precision)
    options = EngineOptions.from_config(cfg.engine)
    engine = Engine(model.pipe, sampler, model.resolution, cfg.device, dtype, options)
    stages = Stages(model, engine, cache, task, str(cfg.precision), instances)
    context = EvalContext(
        task, model.judges, str(cfg.device), stages.images.base_images, stages.cache
    )
    evaluators = build_evaluators(cfg, context)
    attacks = build_attacks(cfg, evaluators)
    provenance = {"model": model.name, "task": task.name, "sampler": sampler.label}

    jobs = [
        Job(name, settings, n, seed, targets, retain)
        for n, targets, retain in splits
        for seed in seeds
        for name, settings in methods.items()
    ]
    out = JobOutputs()
    prompt_hashes: dict[str, str] = {}
    for job in progress(jobs, desc="jobs", unit="job"):
        erased = stages.erase(job)
        run_row = {
            "method": job.method,
            "n_concepts": job.n_concepts,
            "seed": job.seed,
            "status": erased.status,
            "reason": erased.reason,
            "targets": ";".join(job.targets),
            "n_prompts": 0,
            "metrics": "",
            "erase_key": erased.key,
            "weights_id": erased.meta.get("weights_id", ""),
            "changed_tensors": len(erased.meta.get("changed", {})),
            "changed_entries": sum(erased.meta.get("changed", {}).values()),
            "info": info_json(erased.meta),
        }
        out.runs.append(run_row)
        if erased.status != "ok":
            tqdm.write(
                f"[fia_bench] {job.method} n={job.n_concepts} seed={job.seed} failed: "
                f"{erased.reason}"
            )
            continue
        prompts = prompt_sets[job.n_concepts]
        prompt_hashes[f"n_concepts={job.n_concepts}"] = stable_hash(prompts.values.tolist())
        shift = job.seed * SEED_STRIDE if cfg.seed_policy == "erase_and_generate" else 0
        prompts = with_images(
            stages, erased, prompts, [int(s) + shift for s in prompts["evaluation_seed"]]
        )
        run_row["n_prompts"] = len(prompts)
        label = f"{job.method} n={job.n_concepts} seed={job.seed}"
        stages.images.generate(
            erased,
            list(prompts["prompt"]),
            list(prompts["generation_seed"]),
            list(prompts["image_key"]),
            label,
        )
        declared = [
            evaluate(stages, job, prompts, name, ev, provenance, out)
            for name, ev in evaluators.items()
        ]
        targets = prompts[prompts["role"] == "forget"]
        declared += [
            run_attack(stages, job, erased, targets, name, attack, provenance, out)
            for name, attack in attacks.items()
        ]
        run_row["metrics"] = ";".join(e for e in declared if e)

    # jobs run under the registry name; every table names the method by its label
    records = pd.DataFrame(out.records, columns=RECORD_COLUMNS).replace({"method": labels})
    runs = pd.DataFrame(out.runs, columns=RUN_COLUMNS).replace({"method": labels})
    for detail in out.details:
        detail["method"] = labels[detail["method"]]
    counts = vars(stages.counts) | {"seconds_total": time.perf_counter() - started}
    inputs = {
        "model_weights": model.fingerprint,
        "task_file": task.source,
        "task_sha256": file_sha256(task.source),
        "prompt_rows": prompt_hashes,
    }
    # rank 0 writes the run directory; every rank returns its tables and location
    out_dir, summary, tests = distributed.current().leader(
        lambda: (
            out_dir,
            *report.write_run(out_dir, cfg, records, runs, counts, inputs, out.details),
        )
    )
    return RunResult(out_dir, records, runs, summary, tests, counts)


@dataclass
class JobOutputs:
    """Rows collected over the sweep: result records, raw details, one row per job."""

    records: list[dict[str, Any]] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ConfiguredAttack:
    plugin: Attack
    settings: dict[str, Any]
    judge: tuple[str, Evaluator, str]  # (evaluator name, instance, success metric)


def build_attacks(cfg: DictConfig, evaluators: dict[str, Evaluator]) -> dict[str, ConfiguredAttack]:
    out = {}
    for name, node in sorted((cfg.get("attack") or {}).items()):
        settings = plain(node.get("settings"))
        judge_cfg = plain(node.get("judge"))
        judge_name, metric = str(judge_cfg.get("evaluator")), str(judge_cfg.get("metric"))
        if metric not in evaluators[judge_name].higher_is_better:
            raise unknown_choice(
                f"success metric of {judge_name}",
                metric,
                evaluators[judge_name].higher_is_better,
                f"attack.{name}.judge",
            )
        plugin = ATTACKS.get(name, "attack=")(**settings)
        out[name] = ConfiguredAttack(plugin, settings, (judge_name, evaluators[judge_name], metric))
    return out


def with_images(
    stages: Stages, erased: Any, prompts: pd.DataFrame, seeds: list[int]
) -> pd.DataFrame:
    """Prompt rows plus the seed and cache key of the image each one gets."""
    keys = stages.images.keys(erased, list(prompts["prompt"]), seeds)
    return prompts.assign(generation_seed=seeds, image_key=keys)


def evaluate(
    stages: Stages,
    job: Job,
    prompts: pd.DataFrame,
    name: str,
    evaluator: Evaluator,
    provenance: dict[str, str],
    out: JobOutputs,
) -> str:
    """Score the rows of the roles the evaluator's config names (all by default); returns the
    declared ``evaluator/metric=count`` entries."""
    if evaluator.roles:
        prompts = prompts[prompts["role"].isin(evaluator.roles)]
        if prompts.empty:
            raise FiaBenchError(
                f"evaluator {name} scores roles {evaluator.roles}, which this "
                "task has no prompts for (add task.quality for 'quality')"
            )
    scores, details = stages.score(name, evaluator, prompts)
    out.records += score_records(job, prompts, name, evaluator, scores, provenance)
    out.details += [
        {
            "method": job.method,
            "n_concepts": job.n_concepts,
            "seed": job.seed,
            "evaluator": name,
            "prompt_id": prompt_id,
            "detail": detail,
        }
        for prompt_id, detail in details.items()
    ]
    return ";".join(
        declared(
            f"{name}/{metric}",
            ["*"] if metric in evaluator.set_level_metrics else list(prompts["case_id"]),
        )
        for metric in sorted(evaluator.higher_is_better)
    )


def run_attack(
    stages: Stages,
    job: Job,
    erased: Any,
    targets: pd.DataFrame,
    name: str,
    configured: ConfiguredAttack,
    provenance: dict[str, str],
    out: JobOutputs,
) -> str:
    """ASR of one attack: its prompts' images are generated with the erased model and judged."""
    adversarial = stages.attack(
        name, configured.plugin, configured.settings, erased, job, targets, configured.judge
    )
    if not adversarial:
        raise FiaBenchError(
            f"attack {name} returned no prompts for {job.method} "
            f"n_concepts={job.n_concepts} seed={job.seed}"
        )
    rows = pd.DataFrame(
        {
            "case_id": [p.case_id for p in adversarial],
            "prompt": [p.prompt for p in adversarial],
            "evaluation_seed": [p.seed for p in adversarial],
            "concept": [p.concept for p in adversarial],
            "role": "forget",
        }
    )
    rows = with_images(stages, erased, rows, list(rows["evaluation_seed"]))
    stages.images.generate(
        erased,
        list(rows["prompt"]),
        list(rows["generation_seed"]),
        list(rows["image_key"]),
        f"{name} {job.method}",
    )
    judge_name, judge, metric = configured.judge
    scores, _ = stages.score(judge_name, judge, rows)
    success = {s["prompt_id"]: s["value"] >= 50 for s in scores if s["metric"] == metric}
    protocol = f"{name} judged by {judge_name}/{metric}; {judge.protocol()}"
    pre = {p.case_id: p.pre_success for p in adversarial if p.pre_success is not None}
    values = [("asr", case, 100.0 * success[case]) for case in rows["case_id"]]
    values += [("pre_asr", case, 100.0 * hit) for case, hit in pre.items()]
    by_case = rows.set_index("case_id")
    out.records += [
        {
            "method": job.method,
            "n_concepts": job.n_concepts,
            "seed": job.seed,
            "concept": by_case.loc[case, "concept"],
            "role": "forget",
            "prompt_id": case,
            "prompt": by_case.loc[case, "prompt"],
            "evaluator": name,
            "metric": metric_name,
            "value": value,
            "higher_is_better": False,
            "image_key": by_case.loc[case, "image_key"],
            **provenance,
            "protocol": protocol,
        }
        for metric_name, case, value in values
    ]
    out.details += [
        {
            "method": job.method,
            "n_concepts": job.n_concepts,
            "seed": job.seed,
            "evaluator": name,
            "prompt_id": p.case_id,
            "detail": {"source_prompt": p.source_prompt, "prompt": p.prompt},
        }
        for p in adversarial
    ]
    entries = [declared(f"{name}/asr", list(rows["case_id"]))]
    return ";".join(entries + ([declared(f"{name}/pre_asr", list(pre))] if pre else []))


def score_records(
    job: Job,
    prompts: pd.DataFrame,
    evaluator_name: str,
    evaluator: Evaluator,
    scores: list[dict[str, Any]],
    provenance: dict[str, str],
) -> list[dict[str, Any]]:
    """Result rows of one evaluator on one job; set-level values get concept '*' and role 'all'."""
    by_case = prompts.set_index("case_id")
    rows = []
    for score in scores:
        whole_set = score["prompt_id"] == "*"
        row = None if whole_set else by_case.loc[score["prompt_id"]]
        rows.append(
            {
                "method": job.method,
                "n_concepts": job.n_concepts,
                "seed": job.seed,
                "concept": "*" if whole_set else row["concept"],
                "role": "all" if whole_set else row["role"],
                "prompt_id": score["prompt_id"],
                "prompt": "" if whole_set else row["prompt"],
                "evaluator": evaluator_name,
                "metric": score["metric"],
                "value": score["value"],
                "higher_is_better": evaluator.higher_is_better[score["metric"]],
                "image_key": "" if whole_set else row["image_key"],
                **provenance,
                "protocol": evaluator.protocol(),
            }
        )
    return rows


MAX_EVALUATION_SEED = 2**62  # shifted by erasure seeds (< 2**32) times SEED_STRIDE, fits 64 bits


def check_prompt_rows(prompts: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in PROMPT_COLUMNS if c not in prompts.columns]
    if missing or prompts.empty:
        raise FiaBenchError(f"the dataset of {where} returned no rows or lacks {missing}")
    for case, seed in zip(prompts["case_id"], prompts["evaluation_seed"], strict=True):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise FiaBenchError(
                f"{where}: case {case} has evaluation_seed {seed!r}, not an integer"
            )
        if not 0 <= seed < MAX_EVALUATION_SEED:
            raise FiaBenchError(
                f"{where}: case {case} has evaluation_seed {seed}; seeds must be in 0..2**62-1"
            )
    return prompts


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
