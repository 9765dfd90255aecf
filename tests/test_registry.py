"""Registry semantics and the config ↔ plugin bijection."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from fia_bench.api import Method
from fia_bench.errors import FiaBenchError
from fia_bench.registry import (
    ATTACKS,
    DATASETS,
    EVALUATORS,
    METHODS,
    Registry,
    checkout_entry_points,
)

CONF = Path(__file__).resolve().parent.parent / "conf"


def ours(registry: Registry) -> set[str]:
    """The plugins pyproject.toml registers: a third-party package installed beside ours adds
    names of its own, which its configs (not ours) select."""
    group = entry_points(group=registry.entry_point_group)
    return {ep.name for ep in group if ep.dist is not None and ep.dist.name == "fia_bench"}


def config_names(group: str, key: str | None) -> set[str]:
    names = set()
    for path in (CONF / group).glob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        names.add(data[key] if key else path.stem)
    return names


def test_every_method_config_names_a_registered_method_and_vice_versa() -> None:
    assert config_names("method", "name") == ours(METHODS)
    assert ours(METHODS) <= set(METHODS.names())


def test_every_evaluator_config_is_registered_and_vice_versa() -> None:
    # detector is the alias of the model world's detector, itself registered
    assert config_names("evaluator", None) - {"detector"} == ours(EVALUATORS)
    models = [yaml.safe_load(p.read_text()) for p in (CONF / "model").glob("*.yaml")]
    assert {m["detector"] for m in models} <= ours(EVALUATORS)


def test_every_task_config_uses_a_registered_dataset() -> None:
    for path in (CONF / "task").glob("*.yaml"):
        DATASETS.get(yaml.safe_load(path.read_text())["prompts"]["dataset"])


def test_unknown_name_lists_choices_and_nearest_match() -> None:
    with pytest.raises(
        FiaBenchError,
        match=r"unknown method 'nnoe'.*valid choices: .*none.*"
        r"did you mean 'none'",
    ):
        METHODS.get("nnoe")


def test_register_decorator_duplicates_and_base_class() -> None:
    @METHODS.register("test_only_method")
    class TestOnly(Method):
        pass

    try:
        assert METHODS.get("test_only_method") is TestOnly
        with pytest.raises(FiaBenchError, match="registered twice"):
            METHODS.register("none")(TestOnly)
        with pytest.raises(FiaBenchError, match="must be a subclass of Method"):
            METHODS.register("not_a_method")(dict)
    finally:
        METHODS.unregister("test_only_method")
    assert "test_only_method" not in METHODS.names()


def test_importing_the_core_imports_no_heavy_dependency() -> None:
    code = (
        "import sys, fia_bench, fia_bench.registry as r; r.METHODS.names(); "
        "r.EVALUATORS.names(); print(sorted(m for m in ('torch', 'diffusers', 'open_clip', "
        "'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("registry", [METHODS, EVALUATORS, ATTACKS, DATASETS], ids=lambda r: r.kind)
def test_a_checkout_declares_the_same_plugins_as_the_installed_package(registry) -> None:
    """Run from a checkout that is not installed, the registry reads pyproject.toml; that list
    must be the one the installed metadata was made from."""
    checkout = checkout_entry_points()[registry.entry_point_group]
    installed = entry_points(group=registry.entry_point_group)
    assert checkout == {ep.name: ep.value for ep in installed if ep.dist.name == "fia_bench"}


def test_a_checkout_that_is_not_installed_still_finds_the_built_in_plugins(tmp_path: Path) -> None:
    """A PYTHONPATH run on a machine where the package is not installed (a lent GPU box) once
    answered "unknown method 'fia'; valid choices: (none)"."""
    code = (
        "import importlib.metadata as md\n"
        "real = md.distribution\n"
        "def hidden(name):\n"
        "    if name == 'fia_bench': raise md.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "md.distribution = hidden\n"
        "md.entry_points = lambda group: []\n"
        "from fia_bench.registry import METHODS\n"
        "print(METHODS.get('fia').__name__, len(METHODS.names()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, count = out.stdout.split()
    assert name == "FIA" and int(count) == len(ours(METHODS))


def test_every_attack_config_is_registered_and_vice_versa() -> None:
    # all is the bundle of the three searching attacks (prompt_replay needs a user's file)
    assert config_names("attack", None) - {"all"} == ours(ATTACKS)
    bundle = yaml.safe_load((CONF / "attack" / "all.yaml").read_text())["defaults"]
    assert set(bundle) == ours(ATTACKS) - {"prompt_replay"}


@pytest.mark.parametrize("registry", [METHODS, DATASETS, ATTACKS], ids=lambda r: r.kind)
def test_every_plugin_declares_exactly_the_settings_it_takes(registry) -> None:
    """``SETTINGS`` is what the pre-flight check reads: a keyword the class takes but does not
    declare would be refused on the command line, a declared one it does not take would pass the
    check and fail after the model loaded."""
    for name in sorted(ours(registry)):
        plugin = registry.get(name)
        taken = set(inspect.signature(plugin.__init__).parameters) - {"self", "settings"}
        assert set(plugin.SETTINGS.fields) == taken, name


@pytest.mark.parametrize(
    ("group", "name", "extra"),
    [("method", p.stem, []) for p in sorted((CONF / "method").glob("*.yaml"))]
    + [("evaluator", p.stem, []) for p in sorted((CONF / "evaluator").glob("*.yaml"))]
    + [
        ("attack", p.stem, ["evaluator=[detector,clip_accuracy]"])
        for p in sorted((CONF / "attack").glob("*.yaml"))
    ]
    + [("task", p.stem, []) for p in sorted((CONF / "task").glob("*.yaml"))],
)
def test_every_shipped_config_passes_the_settings_check(
    group: str, name: str, extra: list[str], tmp_path: Path
) -> None:
    import fia_bench
    from fia_bench.validate import check_config

    selection = f"{group}=[{name}]" if group in ("evaluator", "attack") else f"{group}={name}"
    world = ["model=sd14"] if name == "objects50" else []  # an SD-only prompt set
    check_config(
        fia_bench.compose(
            [*world, selection, *extra, f"out_dir={tmp_path}", f"cache_dir={tmp_path}"]
        )
    )
