"""A third-party plugin package, made here and really installed (pip, into a --target folder put
on PYTHONPATH), runs with ``method=<its name>`` from the config it ships, and
``python -m fia_bench plugins`` says where its code and config come from. Config folders beyond
our conf/ (``hydra.searchpath``) are seen by the command-line check and refused when they name
code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli

from fia_bench.cli import check_overrides
from fia_bench.errors import FiaBenchError
from fia_bench.plugins import plugin_table

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "theirs-erasure"
version = "0.3.0"

[tool.setuptools]
packages = ["theirs_erasure"]

[tool.setuptools.package-data]
theirs_erasure = ["conf/**/*.yaml"]

[project.entry-points."fia_bench.methods"]
theirs = "theirs_erasure.method:ScaleValues"
unconfigured = "theirs_erasure.method:Unconfigured"

[project.entry-points."fia_bench.configs"]
theirs_erasure = "theirs_erasure"
"""

METHOD = """\
import torch

from fia_bench.api import EraseRequest, Method
from fia_bench.schema import Real, Schema


class ScaleValues(Method):
    SETTINGS = Schema(factor=Real(gt=0))

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def erase(self, request: EraseRequest) -> dict:
        scaled = 0
        with torch.no_grad():
            for name, module in request.engine.pipe.unet.named_modules():
                if name.endswith("attn2.to_v"):
                    module.weight.mul_(self.factor)
                    scaled += 1
        return {"scaled": scaled}


class Unconfigured(ScaleValues):
    pass
"""

CONFIGS = {
    "method/theirs.yaml": "name: theirs\nsettings:\n  factor: 0.5\n",
    "method/ghost.yaml": "name: ghost\nsettings: {}\n",  # names no registered plugin
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built and installed the way a user installs it (no network: its only build
    requirement, setuptools, is taken from this environment)."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    package = src / "theirs_erasure"
    (package / "conf" / "method").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "method.py").write_text(METHOD)
    for name, text in CONFIGS.items():
        (package / "conf" / name).write_text(text)
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run(
        [*pip, "--no-build-isolation", "--target", str(site), str(src)],
        check=True,
        capture_output=True,
        cwd=root,
    )
    return site


def on_path(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_an_installed_plugin_runs_from_its_own_config(installed: Path, tmp_path: Path) -> None:
    assert not (installed / "theirs_erasure" / "conf" / "method" / "theirs.yaml").is_relative_to(
        Path(__file__).resolve().parent.parent
    )
    out = tmp_path / "run"
    args = ["method=theirs", "preset=smoke", "method.settings.factor=0.25", f"out_dir={out}"]
    cli(args, tmp_path / "cache", tmp_path, env=on_path(installed))
    runs = pd.read_csv(out / "runs.csv")
    # named by the setting that differs from its own config's default, as ours are
    theirs = runs[runs["method"] == "theirs[factor=0.25]"]
    assert list(theirs["status"]) == ["ok"]
    info = " ".join(map(str, theirs.iloc[0].tolist()))
    assert "scaled" in info  # what its erase() returned reaches the records
    assert set(pd.read_csv(out / "records.csv")["method"]) == {"none", "theirs[factor=0.25]"}

    # the plugin's settings are checked as ours are, from its own SETTINGS and config
    typo = cli(
        ["method=theirs", "method.settings.factr=1", f"out_dir={tmp_path / 'typo'}"],
        tmp_path / "cache",
        tmp_path,
        check=False,
        env=on_path(installed),
    )
    assert typo.returncode == 2
    assert "unknown config key 'method.settings.factr'" in typo.stderr
    assert "did you mean 'method.settings.factor'" in typo.stderr


def test_plugins_lists_code_and_config_and_flags_what_is_missing(installed: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fia_bench", "plugins"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, **on_path(installed)),
    )
    rows = {tuple(line.split()[:2]): line for line in proc.stdout.splitlines() if line.strip()}
    config = installed / "theirs_erasure" / "conf" / "method" / "theirs.yaml"
    theirs = rows[("method", "theirs")]
    assert "theirs_erasure.method (theirs-erasure 0.3.0)" in theirs
    assert f"{config} (theirs-erasure 0.3.0)" in theirs
    assert "conf/method/uce.yaml (fia_bench)" in rows[("method", "uce")]
    assert "NO CONFIG" in rows[("method", "unconfigured")]
    assert "NO PLUGIN" in rows[("method", "ghost")]
    assert "2 problem(s):" in proc.stdout
    assert f"{installed / 'theirs_erasure' / 'conf'} (theirs-erasure 0.3.0)" in proc.stdout


def test_our_registry_tests_pass_with_a_third_party_plugin_installed(installed: Path) -> None:
    registry_tests = str(Path(__file__).parent / "test_registry.py")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "vice_versa",
            registry_tests,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, **on_path(installed)),
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "3 passed" in proc.stdout


CONF_UCE_SOFT = "name: uce\nsettings:\n  lamb: 0.1\n"


def conf_folder(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_searchpath_folder_adds_options_to_the_check_and_the_config(tmp_path: Path) -> None:
    import fia_bench

    machine = "# @package _global_\ndevice: cpu\ncache_dir: /scratch/me\n"
    folder = conf_folder(
        tmp_path / "mine", {"method/uce_soft.yaml": CONF_UCE_SOFT, "local/mine.yaml": machine}
    )
    with pytest.raises(FiaBenchError, match="unknown method 'uce_soft'"):
        check_overrides(["method=uce_soft"])
    for entry in (f"file://{folder}", str(folder)):
        overrides = ["method=uce_soft", "local=mine", f"hydra.searchpath=[{entry}]"]
        check_overrides(overrides)
        cfg = fia_bench.compose(overrides)
        assert (cfg.method.name, cfg.method.settings.lamb) == ("uce", 0.1)
        assert cfg.cache_dir == "/scratch/me"  # a wheel install's machine settings


def test_a_pkg_searchpath_names_a_package_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fia_bench

    conf_folder(tmp_path / "my_confs", {"method/uce_soft.yaml": CONF_UCE_SOFT})
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["method=uce_soft", "hydra.searchpath=[pkg://my_confs]"]
    check_overrides(overrides)
    assert fia_bench.compose(overrides).method.settings.lamb == 0.1
    listing = plugin_table(overrides[1:])
    assert f"{tmp_path / 'my_confs' / 'method' / 'uce_soft.yaml'} (hydra.searchpath)" in listing
    with pytest.raises(FiaBenchError, match=r"hydra.searchpath entry 'pkg://no_such_pkg'"):
        check_overrides(["hydra.searchpath=[pkg://no_such_pkg]"])


@pytest.mark.parametrize(
    "text",
    [
        "name: uce\nsettings: {}\nhydra:\n  callbacks:\n    x:\n      _target_: os.makedirs\n",
        "name: uce\nsettings:\n  _target_: os.makedirs\n",
    ],
)
def test_a_searchpath_folder_that_names_code_is_refused(tmp_path: Path, text: str) -> None:
    folder = conf_folder(tmp_path / "bad", {"method/bad.yaml": text})
    with pytest.raises(FiaBenchError, match=r"bad\.yaml: .* is refused; configs from"):
        check_overrides(["method=bad", f"hydra.searchpath=[file://{folder}]"])
    with pytest.raises(FiaBenchError, match="is refused"):
        __import__("fia_bench").compose([f"hydra.searchpath=[file://{folder}]"])
