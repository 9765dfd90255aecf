"""Small promises the README makes: ``preset=smoke`` is small for every method and attack,
``task=explicit`` on Stable Diffusion is I2P, and recipes cite documents the repository has (that
a run given ``out_dir=`` leaves no dated Hydra folder behind is tested in tests/test_cli.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO

import fia_bench
from fia_bench.errors import FiaBenchError
from fia_bench.plan import dry_run

CONF = REPO / "conf"
# Every setting that sizes a training run or an attack search, with the most preset=smoke allows.
SMOKE_BUDGETS = {
    "method": {
        "esd": {"iterations": 10, "ddim_steps": 10},
        "dynamic_mask": {"epochs": 2, "images_per_class": 4},
    },
    "attack": {
        "ring_a_bell": {"population": 8, "generations": 4, "limit": 1},
        "mma_diffusion": {"iterations": 4, "batch_size": 16, "limit": 1},
        "unlearndiffatk": {"n_timesteps": 2, "steps_per_t": 2},
        "prompt_replay": {"limit": 4},
    },
}


def test_smoke_caps_every_method_and_attack_budget_and_the_command_line_still_wins() -> None:
    for name, caps in SMOKE_BUDGETS["method"].items():
        full = fia_bench.compose([f"method={name}"]).method.settings
        smoke = fia_bench.compose([f"method={name}", "preset=smoke"]).method.settings
        for key, cap in caps.items():
            assert smoke[key] is not None and smoke[key] <= cap, (name, key)
            assert full[key] != smoke[key], (name, key)  # the cap is not the default
    attacks = fia_bench.compose(["attack=all", "attack=[all,prompt_replay]", "preset=smoke"])
    for name, caps in SMOKE_BUDGETS["attack"].items():
        for key, cap in caps.items():
            assert attacks.attack[name].settings[key] <= cap, (name, key)
    assert fia_bench.compose(["attack=all"]).attack.ring_a_bell.settings.generations == 3000
    pinned = ["method=esd", "preset=smoke", "method.settings.iterations=3"]
    assert fia_bench.compose(pinned).method.settings.iterations == 3
    # no preset pulls in attacks or settings of plugins the command line did not select
    assert fia_bench.compose(["preset=smoke"]).get("attack") in (None, {})
    for task in ("objects", "styles", "explicit"):
        assert (
            fia_bench.compose([f"task={task}", "preset=smoke"]).task.prompts.settings.per_concept
            == 2
        )
    objects50 = fia_bench.compose(["model=sd14", "task=objects50", "preset=smoke"]).task.prompts
    assert objects50.settings.limit_per_concept == 2


def test_every_training_method_config_has_its_smoke_caps() -> None:
    """A method whose settings size a training loop must say how preset=smoke shrinks it."""
    trained = {"iterations", "epochs", "images_per_class", "steps", "train_steps"}
    for path in sorted((CONF / "method").glob("*.yaml")):
        settings = fia_bench.compose([f"method={path.stem}"]).method.settings
        if trained & set(settings):
            assert (CONF / "preset_caps" / "method" / "smoke" / path.name).is_file(), path.stem


def test_every_method_config_with_settings_applies_its_preset_file() -> None:
    """preset=smoke and preset=mini reach a method only through this defaults line; a config
    without it would run unchanged under either preset, silently."""
    for path in sorted((CONF / "method").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not spec["settings"]:
            continue
        entry = {"optional /preset_caps/method@settings": f"${{preset}}/{path.stem}"}
        assert entry in spec.get("defaults", []), path.name


def test_esd_smoke_run_trains_the_capped_iterations(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        ["method=esd", "preset=smoke", "method.settings.train=esd-x", *FAST],
        out_dir=str(tmp_path / "run"),
    )
    # named by the setting the command line changed; the preset's caps are its defaults
    assert set(result.runs["method"]) == {"none", "esd[train=esd-x]"}
    esd = result.runs[result.runs["method"] == "esd[train=esd-x]"].iloc[0]
    assert esd["status"] == "ok"
    assert '"iterations": 10' in esd["info"]


def test_explicit_task_on_stable_diffusion_plans_i2p(cache_dir: Path) -> None:
    cfg = fia_bench.compose(["model=sd14", "task=explicit"])
    assert cfg.task.prompts.dataset == "i2p"
    assert list(cfg.task.prompts.settings.categories) == ["sexual"]
    assert fia_bench.compose(["model=mini", "task=explicit"]).task.prompts.dataset == "templates"
    smoke = fia_bench.compose(["model=sd15", "task=explicit", "preset=smoke"]).task.prompts
    assert (smoke.dataset, smoke.settings.limit) == ("i2p", 4)
    with pytest.raises(
        FiaBenchError, match=r"unknown setting 'per_concept' in task\.prompts\.settings"
    ):
        dry_run(["model=sd14", "task=explicit", "+task.prompts.settings.per_concept=2"], False)
    plan = dry_run(
        ["model=sd14", "task=explicit", "seeds=1"], multirun=False
    )  # offline: never downloads
    assert "task.prompts: file not cached, counted as its limit (931 rows)" in plan
    assert "forget 931" in plan


CITED = re.compile(r"(?:docs|conf|experiments|datasets|methods|evaluators|fia_bench)/[\w./-]+")
OUTPUT = re.compile(r"--out\s+(\S+)")


def cited_documents(recipe: Path) -> list[str]:
    """Repository paths named in a recipe's header comment and its ``spec`` and ``paper`` keys
    (paths after ``--out`` are what a command writes, not citations)."""
    text = recipe.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(OUTPUT.sub("", line))
    spec = re.findall(r"^  spec: (.*)$", text, flags=re.M)
    paths = [p.rstrip(".,;:)") for p in CITED.findall(" ".join(header + spec))]
    bare = [w for s in spec for w in re.findall(r"(?<![/\w])[\w-]+\.md", s)]
    papers = re.findall(r"^  paper: \[(.*)\]$", text, flags=re.M)
    tables = [f"experiments/paper_tables/{p.strip()}" for ps in papers for p in ps.split(",") if p]
    return paths + bare + tables


@pytest.mark.parametrize(
    "recipe", sorted((CONF / "experiment").rglob("*.yaml")), ids=lambda p: p.stem
)
def test_recipes_cite_only_documents_in_the_repository(recipe: Path) -> None:
    cited = cited_documents(recipe)
    missing = [c for c in cited if not (REPO / c).exists()]
    assert not missing, f"{recipe.relative_to(REPO)} cites {missing}"
