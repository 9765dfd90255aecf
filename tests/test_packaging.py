"""The wheel carries what a run reads (configs, prompt data, the recipes' data and paper tables,
the mini world's weights) and finds it installed outside any checkout; an editable install
resolves every package to the one checkout fia_bench itself comes from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# repository folders read at run time, and where the wheel keeps them
SHIPPED = {
    "conf/": "fia_bench/conf/",
    "datasets/data/": "fia_bench/datasets/data/",
    "experiments/data/": "fia_bench/experiments/data/",
    "experiments/paper_tables/": "fia_bench/experiments/paper_tables/",
    "experiments/throughput_h100.yaml": "fia_bench/experiments/throughput_h100.yaml",
    "fia_bench/miniworld/weights/": "fia_bench/miniworld/weights/",
    "fia_bench/miniworld/recipe.yaml": "fia_bench/miniworld/recipe.yaml",
}
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def tracked() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout (the wheel is built from the tracked files)")
    return [p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tracked files, as a fresh clone would build it, with a
    machine's own conf/local/default.yaml beside them (it must stay out)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in tracked():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    (src / "conf" / "local" / "default.yaml").write_text("cache_dir: /scratch/someone\n")
    build = [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "--wheel-dir", str(root / "dist"), str(src)], check=True, cwd=root)
    (found,) = (root / "dist").glob("fia_bench-*.whl")
    return found


def test_the_wheel_carries_configs_data_and_weights(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        target + name.removeprefix(source)
        for name in tracked()
        for source, target in SHIPPED.items()
        if name.startswith(source) and not name.startswith("conf/local/")
        if not name.endswith((".gitkeep", ".md"))
    }
    assert len(expected) > 150
    assert sorted(expected - names) == []
    assert not [n for n in names if n.startswith("fia_bench/conf/local/")]
    # every shipped file a config names (${fia_bench_path:...}) is in the wheel
    named = {
        m
        for p in (REPO / "conf").rglob("*.yaml")
        for m in re.findall(r"\$\{fia_bench_path:([^}]+)\}", p.read_text(encoding="utf-8"))
    }
    assert named
    for relative in named:
        assert any(n.startswith(f"fia_bench/{relative}") for n in names), relative
    points = zipfile.ZipFile(wheel).read("fia_bench-0.1.0.dist-info/entry_points.txt").decode()
    assert "fia-bench = fia_bench.cli:main" in points


def test_an_installed_wheel_finds_its_files_outside_any_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    install = [*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True)
    code = """if True:
        import json, fia_bench, fia_bench.methods, fia_bench.datasets, fia_bench.evaluators
        from fia_bench.report import git_state
        from fia_bench.resources import checkout_root, config_dir, shipped
        mini = fia_bench.compose(["model=mini", "experiment=mini/fia/table1"])
        print(json.dumps({
            "checkout": checkout_root() and str(checkout_root()),
            "git": git_state(),
            "modules": [m.__file__ for m in (fia_bench, fia_bench.methods, fia_bench.datasets,
                                             fia_bench.evaluators)],
            "conf": str(config_dir()),
            "files": [mini.model.source, mini.task.quality.settings.path,
                      str(shipped("experiments/paper_tables/fia_table1_imagenette_forget10.csv")),
                      str(shipped("experiments/throughput_h100.yaml"))],
        }))
    """
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    package = site / "fia_bench"
    assert found["checkout"] is None
    assert found["git"] == {"commit": None, "dirty": None}  # not the repository around the venv
    assert all(Path(m).is_relative_to(package) for m in found["modules"]), found["modules"]
    assert Path(found["conf"]) == package / "conf"
    for path in found["files"]:
        assert Path(path).is_relative_to(package) and Path(path).exists(), path


def test_every_package_comes_from_the_checkout_fia_bench_comes_from(tmp_path: Path) -> None:
    """An editable install maps fia_bench.methods & co. to the checkout it was installed from;
    run from another checkout, they must come from that one, as fia_bench does."""
    other = tmp_path / "other_checkout"
    for name in tracked():
        top = name.split("/")[0]
        code_or_config = (
            "fia_bench",
            "methods",
            "evaluators",
            "datasets",
            "conf",
            "pyproject.toml",
        )
        if top in code_or_config and "/weights/" not in name:
            (other / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, other / name)
    modules = ["fia_bench", "fia_bench.methods.uce", "fia_bench.datasets.templates"]
    modules += ["fia_bench.evaluators.attacks.ring_a_bell"]
    code = (
        "import json, importlib.util as u; from fia_bench.resources import config_dir; "
        f"print(json.dumps([u.find_spec(m).origin for m in {modules}] + [str(config_dir())]))"
    )
    for cwd, checkout in ((other, other), (tmp_path, REPO)):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
        )
        paths = json.loads(out.stdout)
        assert all(Path(p).is_relative_to(checkout) for p in paths), (cwd, paths)
