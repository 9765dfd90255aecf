"""Dry run: what a job or a recipe's sweep will erase, generate, score and attack, what the cache
already holds, and the projected GPU-hours, before any work starts.

    python -m fia_bench experiment=fia/table1 --dry-run        # the recipe's default job
    python -m fia_bench -m experiment=fia/table1 --dry-run     # every job of its sweep

Cache hits are found by computing the keys the stages compute. Those start from the base model's
weights hash, so the model is loaded (from local files only: a dry run never downloads) when it can
be; otherwise every stage is counted as work to do. An edit's images have known keys only once the
edit is cached (its delta decides the weights); until then they count as new, and because a
deterministic method gives every seed the same edit, the count is an upper bound for it. Prompt
files that are not cached yet are counted from the recipe's ``limit``.

GPU time = images to generate / the H100 generation rate for the job's precision, batch size and
step count + the edits' and attacks' costs, from ``experiments/throughput_h100.yaml`` (spec
performance.md); the batch size that ``benchmarks/results/bench_sd_cuda.json`` measured takes its
measured rate when that file exists. Scoring is not included: the judges cost a small fraction
of generation.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig

from fia_bench.api import Task
from fia_bench.cache import Cache, read_json, stable_hash
from fia_bench.engine import Sampler
from fia_bench.erasures import Job
from fia_bench.errors import FiaBenchError
from fia_bench.guidance import ClassifierFree, Guidance
from fia_bench.plugins import with_searchpath
from fia_bench.registry import METHODS
from fia_bench.resources import config_dir, shipped
from fia_bench.runner import build_dataset, check_prompt_rows, resolve_seeds, resolve_splits
from fia_bench.stages import SEED_STRIDE
from fia_bench.tasks import load_task, world_vocabulary
from fia_bench.validate import check_config, plain, selected_evaluators

THROUGHPUT_FILE = shipped("experiments/throughput_h100.yaml")
BENCH_FILE = shipped("benchmarks/results/bench_sd_cuda.json")
UNEDITED = "none"  # the registry name of the unedited model: its edit is empty by definition


# ---- GPU-time figures --------------------------------------------------------------------------
def steps_scale(measured: int, steps: int, tflop_per_step: float, tflop_decode: float) -> float:
    """A rate measured at ``measured`` sampling steps, times this, is the rate at ``steps``:
    an image costs its steps' UNet passes and one decode."""
    return (measured * tflop_per_step + tflop_decode) / (steps * tflop_per_step + tflop_decode)


@dataclass(frozen=True)
class Rate:
    """Measured generation rates of one precision: images/s by batch size at ``steps`` steps."""

    steps: int
    by_batch: dict[int, float]
    sources: dict[int, str]  # where each batch size's figure comes from


@dataclass(frozen=True)
class Throughput:
    """Seconds of GPU time per unit of work, for one model architecture and resolution."""

    device: str
    architecture: str
    resolution: int
    rates: dict[str, Rate]  # by precision
    tflop_per_step: float
    tflop_decode: float
    erase: dict[str, dict[str, float]]
    attack_per_prompt: dict[str, float]
    source: str

    def generation_rate(self, precision: str, batch_size: int, steps: int) -> tuple[float, str]:
        """Images/s at ``steps`` sampling steps: the largest measured batch not above the job's,
        scaled from the measured step count by the UNet's share of the FLOPs."""
        if precision not in self.rates:
            raise FiaBenchError(
                f"no generation rate for precision={precision} in {self.source}; "
                f"measured: {', '.join(self.rates)}"
            )
        rate = self.rates[precision]
        batch = max((b for b in rate.by_batch if b <= batch_size), default=min(rate.by_batch))
        measured = rate.by_batch[batch]
        scale = steps_scale(rate.steps, steps, self.tflop_per_step, self.tflop_decode)
        source = rate.sources[batch]
        basis = f"from {measured:g} img/s measured at batch {batch}, {rate.steps} steps ({source})"
        return measured * scale, basis

    def branch_share(self, steps: int) -> float:
        """What one more UNet branch per image (a guidance's third branch) costs at ``steps``
        steps, as a share of one image (its CFG pair at every step and its decode)."""
        unet = steps * self.tflop_per_step
        return unet / 2 / (unet + self.tflop_decode)

    def erase_seconds(self, method: str, n_concepts: int) -> float:
        if method not in self.erase:
            raise FiaBenchError(
                f"no erasure cost for method '{method}' in {self.source}; add it under "
                f"erase_seconds (known: {', '.join(sorted(self.erase))})"
            )
        cost = self.erase[method]
        return float(cost.get("fixed", 0.0)) + float(cost.get("per_concept", 0.0)) * n_concepts

    def attack_seconds(self, attack: str, prompts: int) -> float:
        if attack not in self.attack_per_prompt:
            raise FiaBenchError(
                f"no attack cost for '{attack}' in {self.source}; add it under "
                f"attack_seconds_per_prompt (known: {', '.join(sorted(self.attack_per_prompt))})"
            )
        return self.attack_per_prompt[attack] * prompts


BENCH_KEYS = ("engine_images_per_s", "steps", "batch_size", "precision")


def load_throughput(figures: Path = THROUGHPUT_FILE, bench: Path = BENCH_FILE) -> Throughput:
    """The spec's H100 figures; a committed CUDA benchmark of our own engine replaces the rate of
    the precision and batch size it measured (it timed what this harness actually does), and the
    spec's other batch sizes stay: one batch's rate says nothing of batch 1's."""
    data = yaml.safe_load(figures.read_text(encoding="utf-8"))
    gen = data["generation"]
    spec = f"{figures.name}: {data['source']}"
    flops = float(gen["tflop_per_step"]), float(gen["tflop_decode"])
    rates = {
        str(p): Rate(
            int(gen["steps"]),
            {int(b): float(r) for b, r in table.items()},
            {int(b): spec for b in table},
        )
        for p, table in gen["images_per_s"].items()
        if isinstance(table, dict)
    }
    if bench.is_file():
        measured = read_json(bench).get("generation") or {}
        missing = [k for k in BENCH_KEYS if k not in measured]
        if missing:
            raise FiaBenchError(
                f"{bench}: 'generation' lacks {', '.join(missing)} (needs {', '.join(BENCH_KEYS)})"
            )
        if int(measured.get("resolution", data["resolution"])) != int(data["resolution"]):
            raise FiaBenchError(
                f"{bench}: measured at {measured['resolution']} px; the projection needs "
                f"{data['resolution']} px (re-run the CUDA benchmark at that resolution)"
            )
        precision, batch = str(measured["precision"]), int(measured["batch_size"])
        at_spec_steps = float(measured["engine_images_per_s"]) * steps_scale(
            int(measured["steps"]), int(gen["steps"]), *flops
        )
        spec_rate = rates.get(precision, Rate(int(gen["steps"]), {}, {}))
        rates[precision] = Rate(
            spec_rate.steps,
            spec_rate.by_batch | {batch: at_spec_steps},
            spec_rate.sources | {batch: f"{bench.name}: our engine, measured"},
        )
    aliases = {str(p): str(a) for p, a in gen["images_per_s"].items() if isinstance(a, str)}
    rates |= {p: rates[a] for p, a in aliases.items()}
    return Throughput(
        device=str(data["device"]),
        architecture=str(data["architecture"]),
        resolution=int(data["resolution"]),
        rates=rates,
        tflop_per_step=flops[0],
        tflop_decode=flops[1],
        erase={str(k): dict(v) for k, v in data["erase_seconds"].items()},
        attack_per_prompt={str(k): float(v) for k, v in data["attack_seconds_per_prompt"].items()},
        source=figures.name,
    )


# ---- the jobs a command line makes -------------------------------------------------------------
def compose_with_hydra(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            config_name="config", overrides=with_searchpath(overrides), return_hydra_config=True
        )


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override list of every job Hydra's basic sweeper launches under -m: the cartesian
    product of the config's ``hydra.sweeper.params`` and the command line's comma lists (the
    command line wins for a key given in both), in the sweeper's order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in given if not o.is_sweep_override()]
    params = compose_with_hydra(fixed).hydra.sweeper.get("params") or {}
    dims: dict[str, list[str]] = {}
    for o in [
        *parser.parse_overrides([f"{k}={v}" for k, v in params.items()]),
        *(o for o in given if o.is_sweep_override()),
    ]:
        key = o.get_key_element()
        values = o.sweep_string_iterator() if o.is_sweep_override() else [o.value()]
        dims[key] = [f"{key}={v}" for v in values]
    return [fixed + list(combo) for combo in itertools.product(*dims.values())]


def single_job(overrides: list[str]) -> list[str]:
    """Without -m Hydra runs one job and refuses comma lists; so does the dry run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            raise FiaBenchError(f"'{o.input_line}' lists several values: add -m to sweep them")
    return list(overrides)


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """diffusers logs each failed hub lookup; the plan reports the one line that matters."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Prompt files come from the cache only during planning (a dry run fetches nothing)."""
    before = os.environ.get("FIA_BENCH_OFFLINE")
    os.environ["FIA_BENCH_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["FIA_BENCH_OFFLINE"]
        else:
            os.environ["FIA_BENCH_OFFLINE"] = before


# ---- keys the stages compute -------------------------------------------------------------------
@dataclass
class ModelIdentity:
    """The loaded model's stages (for real keys), or why the model could not be loaded."""

    stages: Any = None
    reason: str = ""

    @property
    def known(self) -> bool:
        return self.stages is not None


def model_identity(cfg: DictConfig, task: Task, cache: Cache) -> ModelIdentity:
    """Load the base model on the CPU, from local files only, to compute the stages' keys."""
    from fia_bench.engine import Engine
    from fia_bench.models import load_model, torch_dtype
    from fia_bench.stages import Stages

    try:
        with warnings.catch_warnings(), quiet_hub():
            warnings.simplefilter("ignore", FutureWarning)
            model = load_model(cfg.model, world_vocabulary(task.world), "cpu", str(cfg.precision))
    except (FiaBenchError, OSError) as err:
        detail = str(err).splitlines()[0]
        detail = detail if len(detail) <= 120 else detail[:120] + "…"
        return ModelIdentity(
            reason=f"model `{cfg.model.name}` is not in local files (a dry run never downloads): "
            f"{detail}"
        )
    engine = Engine(
        model.pipe,
        Sampler.from_config(cfg.sampler),
        model.resolution,
        "cpu",
        torch_dtype(str(cfg.precision)),
    )
    return ModelIdentity(stages=Stages(model, engine, cache, task, str(cfg.precision)))


# ---- planning ----------------------------------------------------------------------------------
@dataclass
class JobPlan:
    """One Hydra job: the runner's (n_concepts × seed × method) sweep, counted stage by stage."""

    label: str
    method: str
    model: str
    architecture: str
    resolution: int
    precision: str
    sampler: Sampler
    batch_size: int  # images per engine batch: the sampler's, capped by an int engine.batch_size
    # (method, concepts it erases): n_concepts, or fewer for a sequential method that resumes
    erase_todo: list[tuple[str, int]] = field(default_factory=list)
    erase_cached: int = 0
    erase_shared: int = 0  # made earlier in the same plan
    rows_per_role: dict[str, int] = field(default_factory=dict)
    images_todo: int = 0
    images_cached: int = 0
    images_shared: int = 0  # made earlier in the same plan (the reference's, shared by methods)
    extra_branches: int = 0  # UNet branches beyond the CFG pair, summed over images to make
    scored: dict[str, int] = field(default_factory=dict)
    attack_prompts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Planner:
    """Counts work over a sweep; keys seen by an earlier job are shared, as the cache shares
    them when the jobs run one after another."""

    def __init__(self) -> None:
        self.erased: set[str] = set()
        self.images: set[str] = set()
        self.scored: set[str] = set()
        self.models: dict[str, ModelIdentity] = {}

    def identity(self, cfg: DictConfig, task: Task, cache: Cache) -> ModelIdentity:
        key = stable_hash([plain(cfg.model), str(cfg.precision), task.world])
        if key not in self.models:
            self.models[key] = model_identity(cfg, task, cache)
        return self.models[key]

    def prompt_rows(
        self,
        cfg: DictConfig,
        task: Task,
        cache: Cache,
        targets: tuple[str, ...],
        retain: tuple[str, ...],
        notes: list[str],
    ) -> pd.DataFrame:
        parts = []
        for key in ("prompts", "quality"):
            node = cfg.task.get(key)
            if not node:
                continue
            dataset = build_dataset(node, f"task.{key}", cache)
            try:
                with offline():
                    rows = dataset.rows(task, targets, retain)
            except FiaBenchError as err:
                limit = (plain(node.get("settings")) or {}).get("limit")
                if not limit:
                    raise FiaBenchError(
                        f"task.{key}: {err}; pin task.{key}.settings.limit to plan without it"
                    ) from err
                notes.append(f"task.{key}: file not cached, counted as its limit ({limit} rows)")
                role = "quality" if key == "quality" else "forget"
                rows = pd.DataFrame(
                    {
                        "case_id": [f"{key}-{i}" for i in range(int(limit))],
                        "prompt": [f"<{key} {i}>" for i in range(int(limit))],
                        "evaluation_seed": range(int(limit)),
                        "concept": targets[0],
                        "role": role,
                    }
                )
            parts.append(check_prompt_rows(rows, f"task.{key}"))
        return pd.concat(parts, ignore_index=True)

    def plan(self, cfg: DictConfig, label: str) -> JobPlan:
        check_config(cfg, machine=False)  # a plan is often made away from the GPU it is for
        seeds = resolve_seeds(cfg.seeds)
        task = load_task(str(cfg.task.name), str(cfg.model.world))
        splits = resolve_splits(cfg, task)
        cache = Cache(cfg.cache_dir)
        sampler = Sampler.from_config(cfg.sampler)
        precision = str(cfg.precision)
        method_settings = plain(cfg.method.get("settings"))
        methods = {str(cfg.reference): {}} | {str(cfg.method.name): method_settings}
        engine_batch = (cfg.get("engine") or {}).get("batch_size")
        job = JobPlan(
            label=label,
            batch_size=min(sampler.batch_size, engine_batch)
            if isinstance(engine_batch, int)
            else sampler.batch_size,
            method=str(cfg.method.name),
            model=str(cfg.model.name),
            architecture=str(cfg.model.get("architecture", "")),
            resolution=int(cfg.model.resolution),
            precision=precision,
            sampler=sampler,
        )
        model = self.identity(cfg, task, cache)
        if not model.known:
            job.notes.append(f"cache not checked: {model.reason}")
        identity = {
            "sampler": sampler.cache_identity(),
            "resolution": int(cfg.model.resolution),
            "precision": precision,
            "model": plain(cfg.model),
        }
        for n, targets, retain in splits:
            rows = self.prompt_rows(cfg, task, cache, targets, retain, job.notes)
            for role, count in rows["role"].value_counts().items():
                job.rows_per_role[str(role)] = max(job.rows_per_role.get(str(role), 0), int(count))
            for seed in seeds:
                shift = seed * SEED_STRIDE if cfg.seed_policy == "erase_and_generate" else 0
                generation_seeds = [int(s) + shift for s in rows["evaluation_seed"]]
                for name, settings in methods.items():
                    weights = self.erase(job, model, name, settings, n, targets, retain, seed, task)
                    if weights is None:
                        continue
                    guidance = METHODS.get(name, "method=")(**settings).sampling_guidance(
                        targets, task
                    )
                    keys = self.generate(
                        job, model, weights, guidance, rows, generation_seeds, identity
                    )
                    self.count_scores(job, cfg, rows, keys)
                    self.count_attacks(job, cfg, rows)
        return job

    def erase(
        self,
        job: JobPlan,
        model: ModelIdentity,
        name: str,
        settings: dict[str, Any],
        n: int,
        targets: tuple[str, ...],
        retain: tuple[str, ...],
        seed: int,
        task: Task,
    ) -> tuple[str, bool] | None:
        """Count the edit; returns its images' weights id and whether that id is the stages'
        (the base model's, or a cached edit's) rather than a stand-in unique to the edit, or
        None for a cached failed edit (the runner generates nothing for it)."""
        fingerprint = model.stages.model.fingerprint if model.known else ""
        plugin = METHODS.get(name, "method=")
        erasure = Job(name, settings, n, seed, targets, retain)

        def resumable(k: int) -> bool:
            """The first k targets' erasure is planned before this one, or stored whole."""
            prefix = erasure.prefix(k).key(fingerprint, job.precision, task.name, plugin)
            stored = model.stages.erasures.record(prefix) if model.known else None
            return prefix in self.erased or (stored is not None and stored["status"] == "ok")

        key = erasure.key(fingerprint, job.precision, task.name, plugin)
        # a damaged entry is recomputed: to do
        meta = model.stages.erasures.record(key) if model.known else None
        cached = meta is not None
        if key in self.erased:
            job.erase_shared += 1
        elif cached:
            job.erase_cached += 1
        else:
            # a sequential method erases only the targets beyond the longest resumable prefix
            sequential = range(n - 1, 0, -1) if plugin.sequential else range(0)
            done = next((k for k in sequential if resumable(k)), 0)
            job.erase_todo.append((name, n - done))
        self.erased.add(key)
        if model.known and name == UNEDITED:
            return model.stages.images.base_weights_id, True
        if cached:
            return (str(meta["weights_id"]), True) if meta["status"] == "ok" else None
        return ("unedited" if name == UNEDITED else f"edit-{key}"), False

    def generate(
        self,
        job: JobPlan,
        model: ModelIdentity,
        weights: tuple[str, bool],
        guidance: Guidance | None,
        rows: pd.DataFrame,
        seeds: list[int],
        identity: dict[str, Any],
    ) -> list[str]:
        """Count the images of one edit's prompt rows; returns their keys (real or stand-in)."""
        from fia_bench import artifacts
        from fia_bench.erasures import Erased

        weights_id, known = weights
        prompts = list(rows["prompt"])
        erased = Erased("plan", "ok", "", artifacts.Delta(), {"weights_id": weights_id}, guidance)
        if known:
            keys = model.stages.images.keys(erased, prompts, seeds)
        else:  # stand-in keys: the same images of the same edit still count once
            keys = [
                stable_hash({**erased.sampling_identity(), "prompt": p, "seed": s, **identity})
                for p, s in zip(prompts, seeds, strict=True)
            ]
        extra = 0 if guidance is None else guidance.branches - ClassifierFree.branches
        for k in keys:
            if k in self.images:
                job.images_shared += 1
            elif known and model.stages.images.path(k).exists():
                job.images_cached += 1
            else:
                job.images_todo += 1
                job.extra_branches += extra
            self.images.add(k)
        return keys

    def count_scores(
        self, job: JobPlan, cfg: DictConfig, rows: pd.DataFrame, keys: list[str]
    ) -> None:
        """Images each evaluator scores; an image set scored before (the reference's, shared by
        every seed under seed_policy=erase) is a score-cache hit and not counted again."""
        for name, node in selected_evaluators(cfg).items():
            roles = list(node.get("roles") or [])
            picked = [k for k, r in zip(keys, rows["role"], strict=True) if not roles or r in roles]
            scored_set = stable_hash([name, node, picked])
            if scored_set not in self.scored:
                self.scored.add(scored_set)
                job.scored[name] = job.scored.get(name, 0) + len(picked)

    @staticmethod
    def count_attacks(job: JobPlan, cfg: DictConfig, rows: pd.DataFrame) -> None:
        targets = int((rows["role"] == "forget").sum())
        for name, node in sorted((cfg.get("attack") or {}).items()):
            limit = (plain(node.get("settings")) or {}).get("limit")
            prompts = min(targets, int(limit)) if limit else targets
            job.attack_prompts[name] = job.attack_prompts.get(name, 0) + prompts
            job.images_todo += prompts  # one image per adversarial prompt, judged


# ---- GPU time and the printed plan -------------------------------------------------------------
@dataclass
class Cost:
    generation_s: float
    erase_s: float
    attack_s: float
    basis: str

    @property
    def total_h(self) -> float:
        return (self.generation_s + self.erase_s + self.attack_s) / 3600


def job_cost(job: JobPlan, figures: Throughput) -> Cost | None:
    """GPU seconds on the figures' device, or None where they do not describe this model."""
    if job.architecture != figures.architecture or job.resolution != figures.resolution:
        return None
    rate, basis = figures.generation_rate(job.precision, job.batch_size, job.sampler.steps)
    extra = job.extra_branches * figures.branch_share(job.sampler.steps)
    return Cost(
        generation_s=(job.images_todo + extra) / rate,
        erase_s=sum(figures.erase_seconds(m, n) for m, n in job.erase_todo),
        attack_s=sum(figures.attack_seconds(a, p) for a, p in job.attack_prompts.items()),
        basis=f"{rate:.2f} img/s at {job.sampler.steps} steps, {job.precision}, batch "
        f"{job.batch_size}: {basis}",
    )


def render(
    cfg: DictConfig, jobs: list[JobPlan], figures: Throughput, multirun: bool, sweep_size: int
) -> str:
    from fia_bench.report import markdown_table

    recipe = cfg.get("recipe") or {}
    first = jobs[0]
    what = f"recipe `{recipe['name']}`: {recipe.get('title', '')}" if recipe else "one job"
    lines = [
        f"# Dry run of {what}",
        "",
        "Nothing is erased, generated or scored. "
        f"Model `{first.model}` · precision `{first.precision}` · sampler `{first.sampler.label}` "
        f"· batch {first.batch_size} · {first.resolution} px · task `{cfg.task.name}` "
        f"· seeds {resolve_seeds(cfg.seeds)} · seed_policy `{cfg.seed_policy}` "
        f"· cache `{cfg.cache_dir}`.",
    ]
    if recipe.get("spec"):
        lines.append(f"The recipe follows {recipe['spec']}.")
    if not multirun and sweep_size > 1:
        lines.append(
            f"Without -m Hydra runs only this job; add -m to run the recipe's {sweep_size} jobs."
        )
    lines.append("")
    costs = [job_cost(j, figures) for j in jobs]
    header = [
        "job",
        "method",
        "edits to do / cached / reused",
        "prompt rows per role",
        "images to generate",
        "cached",
        "reused",
        "images to score",
        "attack prompts",
        "GPU-h",
    ]
    rows = [
        [
            job.label,
            job.method,
            f"{len(job.erase_todo)} / {job.erase_cached} / {job.erase_shared}",
            ", ".join(f"{r} {c}" for r, c in sorted(job.rows_per_role.items())),
            str(job.images_todo),
            str(job.images_cached),
            str(job.images_shared),
            ", ".join(f"{e} {c}" for e, c in job.scored.items()),
            ", ".join(f"{a} {c}" for a, c in job.attack_prompts.items()) or "—",
            f"{cost.total_h:.2f}" if cost else "—",
        ]
        for job, cost in zip(jobs, costs, strict=True)
    ]
    lines += [markdown_table(header, rows), ""]
    lines += [f"- {n}" for n in dict.fromkeys(n for j in jobs for n in j.notes)]
    lines += [
        f"- totals: {sum(len(j.erase_todo) for j in jobs)} edits to make "
        f"({sum(j.erase_cached for j in jobs)} cached), "
        f"{sum(j.images_todo for j in jobs)} images to generate "
        f"({sum(j.images_cached for j in jobs)} cached; {sum(j.images_shared for j in jobs)} "
        "reused: made once in this plan and needed again, e.g. the unedited model's), "
        f"{sum(sum(j.scored.values()) for j in jobs)} images to score",
        "- an edit that is not cached yet has unknown weights, so its images count once per "
        "seed: an upper bound for methods whose edit does not depend on the seed",
    ]
    if any(c is None for c in costs):
        lines.append(
            f"- no GPU-hour projection: the figures are for the {figures.architecture} "
            f"architecture at {figures.resolution} px and this model is `{first.model}`"
        )
    else:
        gen = sum(c.generation_s for c in costs) / 3600
        erase = sum(c.erase_s for c in costs) / 3600
        attack = sum(c.attack_s for c in costs) / 3600
        lines += [
            f"- projected GPU-hours on one {figures.device}: **{gen + erase + attack:.1f} h** = "
            f"generation {gen:.1f} h + edits {erase:.1f} h + attack searches {attack:.1f} h "
            "(scoring not included)",
            f"- generation rate {costs[0].basis}",
        ]
    return "\n".join(lines) + "\n"


def dry_run(overrides: list[str], multirun: bool) -> str:
    """The plan of a command line, as printed by ``--dry-run``."""
    from fia_bench import compose

    sweep = sweep_jobs(overrides)
    planned = sweep if multirun else [single_job(overrides)]
    planner, figures = Planner(), load_throughput()
    jobs, configs = [], []
    for i, job_overrides in enumerate(planned):
        configs.append(compose(job_overrides))
        swept = [o for o in job_overrides if o not in overrides]
        jobs.append(planner.plan(configs[-1], " ".join([str(i), *swept])))
    return render(configs[0], jobs, figures, multirun, len(sweep))
