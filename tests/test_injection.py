"""Nothing on the command line or in a local config runs code: Hydra's callbacks and
``_target_`` instantiation are refused before Hydra sees them, and the callable they name never
runs (here ``os.makedirs``, whose folder would be the evidence)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli

from fia_bench import cli as fia_cli
from fia_bench.resources import config_dir


@pytest.mark.parametrize(
    "injected",
    [
        ["+hydra.callbacks.x._target_=os.makedirs", "+hydra.callbacks.x.name={evidence}"],
        ["+hydra={{callbacks: {{x: {{_target_: os.makedirs, name: '{evidence}'}}}}}}"],
        ["-m", "+hydra.callbacks.x._target_=os.makedirs", "+hydra.callbacks.x.name={evidence}"],
    ],
)
def test_callbacks_on_the_command_line_are_refused_and_never_run(
    tmp_path: Path, injected: list[str]
) -> None:
    evidence = tmp_path / "injected"
    args = [a.format(evidence=evidence) for a in injected]
    proc = cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "c", tmp_path, check=False)
    assert proc.returncode == 2
    assert "never by import path" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not evidence.exists()


@pytest.mark.parametrize(
    "local",
    [
        {"hydra": {"callbacks": {"x": {"_target_": "os.makedirs", "name": "{evidence}"}}}},
        {"logger": {"_target_": "os.makedirs", "name": "{evidence}"}},
        {"hydra": {"searchpath": ["file://{evidence}"]}},
    ],
)
def test_local_configs_that_name_code_are_refused_and_never_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    local: dict,
) -> None:
    evidence = tmp_path / "injected"
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    text = yaml.safe_dump(local).replace("{evidence}", str(evidence))
    (conf / "local" / "default.yaml").write_text(text)
    monkeypatch.setattr(fia_cli, "config_dir", lambda: conf)
    monkeypatch.setattr(sys, "argv", ["fia_bench", "model=tiny_random", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        fia_cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "local/default.yaml" in err and "is refused" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not evidence.exists()


def test_a_local_config_that_sets_values_is_accepted(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "local").mkdir(parents=True)
    (conf / "local" / "default.yaml").write_text("cache_dir: /scratch/me\ndevice: cpu\n")
    fia_cli.check_local_configs(conf)
