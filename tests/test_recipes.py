"""Paper-table recipes: every experiment composes with its pins, each SD recipe has a mini-world
analogue of the same structure, and every mini analogue runs end to end at smoke size on the
shipped mini world, with its own judges, and yields its comparison report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

import fia_bench
from fia_bench.compare import PAPER_TABLES, SD_VERSIONS, check_recipe, compare
from fia_bench.plan import compose_with_hydra, sweep_jobs
from fia_bench.records import registered_name
from fia_bench.registry import METHODS
from fia_bench.tasks import load_task
from fia_bench.validate import check_config

CONF = Path(__file__).resolve().parent.parent / "conf" / "experiment"
EXPERIMENTS = sorted(p.relative_to(CONF).with_suffix("").as_posix() for p in CONF.rglob("*.yaml"))
BUILDING_BLOCKS = [e for e in EXPERIMENTS if e.startswith(("arm/", "parts/"))]
# experiments that set a sweep's protocol without reproducing a paper table
SWEEPS = ["results_mini", "tiny_sweep"]
RECIPES = [e for e in EXPERIMENTS if e not in BUILDING_BLOCKS and e not in SWEEPS]
SD_RECIPES = [r for r in RECIPES if not r.startswith("mini/")]
MINI_RECIPES = [r for r in RECIPES if r.startswith("mini/")]


def composed(name: str, *extra: str):
    """The recipe as Hydra composes it (not through the tests' tiny-model default)."""
    return compose_with_hydra([f"experiment={name}", *extra])


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=False)


def arms(cfg) -> list[str]:
    params = cfg.hydra.sweeper.get("params") or {}
    return sorted(str(v) for k, v in params.items())


def erased_count(cfg) -> int:
    if cfg.get("concepts"):
        return len(cfg.concepts)
    counts = cfg.n_concepts
    return max(counts) if not isinstance(counts, int) else counts


def test_the_recipe_set_is_the_issue_list() -> None:
    assert set(SD_RECIPES) == {
        "fia/table1",
        "fia/table2",
        "fia/table3",
        "fia/table4",
        "fia/table15",
        "fia/fig6",
        "fia/ablation_layer",
        "fia/ablation_granularity",
        "fia/ablation_alpha",
        "scapre/imagenette",
        "sp/imagenette",
        "sp/i2p",
    }
    assert {r.removeprefix("mini/") for r in MINI_RECIPES} == set(SD_RECIPES)


@pytest.mark.parametrize("name", BUILDING_BLOCKS)
def test_building_blocks_compose(name: str) -> None:
    cfg = composed(name)
    if name.startswith("arm/"):
        METHODS.get(str(cfg.method.name), "method=")


def test_results_mini_sweeps_every_count_of_the_objects_and_scores_the_coco_analogue() -> None:
    """The protocol of make results-mini: issue 16's counts reach every object of the task, and
    CLIP_coco is measured where at 50 erased objects no object is left to retain."""
    cfg = composed("results_mini", "method=fia")
    check_config(cfg, machine=False)
    task = load_task(str(cfg.task.name), str(cfg.model.world))
    assert list(cfg.n_concepts) == [1, 5, 10, 25, 50] == [*cfg.n_concepts[:-1], len(task.concepts)]
    assert cfg.seeds == 3 and cfg.task.quality.dataset == "coco_captions"
    assert list(cfg.evaluator.clip_score.roles) == ["quality"]
    assert "quality" not in cfg.evaluator.clip_accuracy.roles


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_pins_and_paper_rows(name: str) -> None:
    cfg = composed(name)
    recipe = plain(cfg.recipe)
    check_recipe(recipe)
    assert recipe["name"] == name
    assert cfg.seed_policy == "erase"  # paper protocols: seeds vary the edit only
    assert isinstance(cfg.seeds, int) and cfg.seeds >= 1
    assert cfg.get("concepts") or cfg.get("n_concepts")
    paper = pd.concat(
        [pd.read_csv(PAPER_TABLES / t, keep_default_na=False) for t in recipe["paper"]]
    )
    for row in recipe["rows"]:
        METHODS.get(row["method"], "method=")
        if row["paper"] is not None:
            assert row["paper"] in set(paper["method"]), (name, row)
        if row.get("row") is not None:
            assert row["row"] in set(paper["concept_or_row"]), (name, row)
    paper_metrics = set(paper["metric"])
    assert any(m.get("paper_metric", m["name"]) in paper_metrics for m in recipe["metrics"])
    evaluators = dict(cfg.get("evaluator") or {}) | dict(cfg.get("attack") or {})
    for spec in recipe["metrics"]:
        if "source" not in spec:
            continue
        evaluator = spec["source"].split("/")[0]
        assert evaluator in evaluators, (name, spec["name"])
        roles = list(evaluators[evaluator].get("roles") or [])
        assert not roles or spec["role"] in roles or spec["role"] == "all", (name, spec["name"])
    # an evaluator that scores COCO-style quality prompts is meant to, and only the quality ones
    if cfg.task.get("quality"):
        for evaluator, node in (cfg.get("evaluator") or {}).items():
            assert node.get("roles"), f"{name}: {evaluator} must name its prompt roles"


@pytest.mark.parametrize("name", SD_RECIPES)
def test_every_method_row_names_the_official_run_it_follows(name: str) -> None:
    rows = plain(composed(name).recipe)["rows"]
    bare = [r for r in rows if r["method"] != "none" and not r.get("follows")]
    assert not bare, f"{name}: rows without `follows`: {bare}"


@pytest.mark.parametrize("name", SD_RECIPES)
def test_sd_recipes_pin_the_paper_protocol(name: str) -> None:
    cfg = composed(name)
    assert cfg.model.name in SD_VERSIONS and cfg.device == "cuda"
    assert cfg.precision in ("fp16", "fp32")
    assert (cfg.sampler.scheduler, cfg.sampler.steps, cfg.sampler.guidance_scale) == (
        "pndm",
        50,
        7.5,
    )
    # a prompt file fetched on first use pins its row count, so a dry run can count it offline
    for key in ("prompts", "quality"):
        node = cfg.task.get(key)
        if node is not None and node.dataset in ("i2p", "coco_captions"):
            assert node.settings.limit, (name, key)
    paper_models = {
        m
        for t in cfg.recipe.paper
        for m in pd.read_csv(PAPER_TABLES / t, keep_default_na=False)["model"]
    }
    stated = {m for m in paper_models if m.startswith("SD v1.")}
    assert all(m.startswith(SD_VERSIONS[cfg.model.name]) for m in stated), (name, stated)


@pytest.mark.parametrize("name", RECIPES)
def test_every_sweep_job_composes_passes_the_checks_and_fills_a_row(name: str) -> None:
    cfg = composed(name)
    rows = plain(cfg.recipe)["rows"]
    filled = set()
    for overrides in sweep_jobs([f"experiment={name}"]):
        job = compose_with_hydra(overrides)
        check_config(job, machine=False)  # every setting of the job passes the pre-flight check
        method, settings = str(job.method.name), plain(job.method.get("settings")) or {}
        hits = [
            i
            for i, r in enumerate(rows)
            if r["method"] == method
            and all(settings.get(k) == v for k, v in (r.get("settings") or {}).items())
        ]
        assert hits, f"{name}: job {overrides} gives no row of the report"
        filled.update(hits)
        filled.update(i for i, r in enumerate(rows) if r["method"] == str(job.reference))
    empty = [row for i, row in enumerate(rows) if i not in filled]
    assert not empty, f"{name}: no job of the sweep fills these rows: {empty}"


def mini_comparisons():
    path = CONF.parent.parent / "experiments" / "mini_comparisons.py"
    spec = importlib.util.spec_from_file_location("mini_comparisons", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", MINI_RECIPES)
def test_the_cpu_budgets_of_the_mini_comparisons_apply_to_every_job(name: str) -> None:
    """make comparisons-mini adds mini_cpu_budgets.yaml's overrides to the jobs they name: each
    composes, takes effect, and leaves the job's method as the sweep made it."""
    script = mini_comparisons()
    budgets = yaml.safe_load(script.BUDGETS.read_text())
    assert name.removeprefix("mini/") in script.all_recipes()
    for overrides in sweep_jobs([f"experiment={name}"]):
        cfg = compose_with_hydra(overrides)
        extra = script.budget_overrides(cfg, budgets)
        assert bool(extra) == (
            str(cfg.method.name) in budgets["methods"] or bool(cfg.get("attack"))
        )
        job = compose_with_hydra([*overrides, *extra])
        assert job.method.name == cfg.method.name
        for override in extra:
            key, value = override.split("=", 1)
            assert str(OmegaConf.select(job, key)) == value, (name, override)


def test_the_comparison_preface_says_what_each_job_made_and_took_from_the_cache() -> None:
    """A rerun of cached work prints a short wall time; the preface must say so beside it."""
    script = mini_comparisons()
    counts = {"erased": 2, "images_generated": 1200, "erase_cached": 14, "images_cached": 9700}
    rerun = {**counts, "erased": 0, "images_generated": 0, "erase_cached": 1}
    jobs = [
        {
            "job": "0-uce",
            "overrides": ["+experiment/arm=uce"],
            "cpu_budget": [],
            "seconds": 95.2,
            "counts": counts,
        },
        {
            "job": "1-esd",
            "overrides": ["+experiment/arm=esd"],
            "cpu_budget": ["seeds=1"],
            "seconds": 1.4,
            "counts": rerun,
        },
    ]
    rows = [
        line
        for line in script.preface({"recipe": "fia/table1", "jobs": jobs}).splitlines()
        if line.startswith("| 0-") or line.startswith("| 1-")
    ]
    assert rows == [
        "| 0-uce | `+experiment/arm=uce` | as the recipe | 95 s "
        "| 2 edits, 1,200 images (14 edits, 9,700 images cached) |",
        "| 1-esd | `+experiment/arm=esd` | `seeds=1` | 1 s "
        "| 0 edits, 0 images (1 edit, 9,700 images cached) |",
    ]


@pytest.mark.parametrize("name", SD_RECIPES)
def test_mini_analogue_has_the_same_structure(name: str) -> None:
    sd, mini = composed(name), composed(f"mini/{name}")
    assert mini.model.name == "mini" and mini.device == "cpu"
    assert arms(sd) == arms(mini)
    assert [m["name"] for m in mini.recipe.metrics] == [m["name"] for m in sd.recipe.metrics]

    def paper_rows(cfg) -> list[tuple]:
        return [(r.paper, r.get("row")) for r in cfg.recipe.rows if r.paper is not None]

    assert paper_rows(mini) == paper_rows(sd)
    assert list(mini.recipe.paper) == list(sd.recipe.paper)
    assert str(mini.task.name).removesuffix("50") == str(sd.task.name).removesuffix("50")
    mini_task = load_task(str(mini.task.name), "mini")
    assert erased_count(mini) == erased_count(sd)
    mapped = dict(mini.recipe.get("concepts") or {})
    assert set(mapped.values()) <= set(mini_task.concepts)


# ---- smoke runs of the mini analogues ------------------------------------------------------------
SMOKE = ["model=mini", "seeds=2", "sampler.steps=2", "sampler.batch_size=8"]
SHRINK_METHOD = {
    "fia": [
        "method.settings.placeholders_per_concept=1",
        "method.settings.saliency_steps=1",
        "method.settings.inference_steps=2",
    ],
    "dynamic_mask": [
        "method.settings.images_per_class=2",
        "method.settings.batch_size=1",
        "method.settings.epochs=1",
        "method.settings.warmup_steps=1",
        "method.settings.mask_update_interval=0",
        "method.settings.progress=false",
    ],
    "scapre": [],
}
SHRINK_ATTACKS = [
    "attack.ring_a_bell.settings.population=4",
    "attack.ring_a_bell.settings.generations=1",
    "attack.ring_a_bell.settings.length=2",
    "attack.mma_diffusion.settings.iterations=1",
    "attack.mma_diffusion.settings.n_tokens=2",
    "attack.mma_diffusion.settings.topk=2",
    "attack.mma_diffusion.settings.batch_size=2",
    "attack.mma_diffusion.settings.eval_batch_size=2",
    "attack.mma_diffusion.settings.progress=false",
    "attack.unlearndiffatk.settings.k=1",
    "attack.unlearndiffatk.settings.n_timesteps=1",
    "attack.unlearndiffatk.settings.steps_per_t=1",
]


def smoke_overrides(name: str) -> list[str]:
    """Smallest run of a mini recipe: its concept counts, evaluators and metrics stay; prompts,
    sampling steps, method and attack budgets shrink."""
    cfg = composed(name)
    out = [f"experiment={name}", *SMOKE, "task.prompts.settings.per_concept=1"]
    out += SHRINK_METHOD[str(cfg.method.name)]
    if cfg.task.get("quality"):
        out.append("task.quality.settings.limit=4")
    if cfg.get("attack"):
        out += SHRINK_ATTACKS
    return out


@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every smoke run, as a user's recipes share one: the unedited model's images
    and scores on a task, and the edits several recipes pin alike, are made once."""
    return tmp_path_factory.mktemp("mini_cache")


@pytest.mark.parametrize("name", MINI_RECIPES)
def test_mini_recipe_runs_at_smoke_size_and_compares(
    name: str, tmp_path: Path, mini_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIA_BENCH_CACHE", str(mini_cache))
    result = fia_bench.run(smoke_overrides(name), out_dir=str(tmp_path / "run"))
    cfg = composed(name)
    assert set(result.runs["status"]) == {"ok"}
    # the shrunk settings name the method (fia[saliency_steps=1,...]); rows still match it
    assert set(result.runs["method"].map(registered_name)) == {"none", str(cfg.method.name)}
    assert result.counts["images_generated"] + result.counts["images_cached"] > 0
    report = compare([tmp_path / "run"])
    recipe = plain(cfg.recipe)
    for spec in recipe["metrics"]:
        assert f"## {spec['name']}" in report
    ran = [
        r
        for r in recipe["rows"]
        if r["method"] in ("none", str(cfg.method.name)) and not r.get("settings")
    ]
    for row in ran:
        label = row.get("label") or row.get("row") or row["paper"]
        # an FIA row whose ⌈α·C⌉ = 1 names the fusion rule it used: "| FIA [⌈αC⌉=1: …] |"
        assert f"| {label} |" in report or f"| {label} [⌈αC⌉=1" in report, (name, label)
