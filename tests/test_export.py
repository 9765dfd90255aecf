"""python -m fia_bench.export writes a job's erased model as a diffusers pipeline folder that
diffusers loads and method=checkpoint reads back to the same weights, hence the same images."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from conftest import FAST

import fia_bench
from fia_bench import artifacts
from fia_bench.export import main
from fia_bench.report import main as report_main

JOB = ["seeds=1", "n_concepts=[1]", *FAST]


def test_export_round_trip(tmp_path: Path, cache_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from fia_bench.cache import Cache
    from fia_bench.models import random_pipeline
    from fia_bench.tasks import world_vocabulary

    erased = fia_bench.run(["method=uce", *JOB], out_dir=str(tmp_path / "uce"))
    uce = erased.runs.set_index("method").loc["uce"]
    folder = tmp_path / "exported"
    assert main([str(tmp_path / "uce"), "--method", "uce", "--out", str(folder)]) == 0

    # diffusers loads it, and it holds exactly the base weights plus the cached edit
    loaded = artifacts.snapshot(StableDiffusionPipeline.from_pretrained(str(folder)))
    base = random_pipeline("tiny", world_vocabulary("tiny"), resolution=16, seed=0)
    delta = artifacts.Delta.load(Cache(cache_dir).path("erase", uce["erase_key"], ".safetensors"))
    artifacts.apply(base, delta)
    expected = artifacts.snapshot(base)
    assert loaded.keys() == expected.keys() and len(delta.changed) == uce["changed_tensors"] > 0
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)

    back = fia_bench.run(
        ["method=checkpoint", f"method.settings.path={folder}", *JOB],
        out_dir=str(tmp_path / "back"),
    )
    # a checkpoint run is named by the file it loaded, so several files are several columns
    label = f"checkpoint[path={folder}]"
    checkpoint = back.runs.set_index("method").loc[label]
    assert checkpoint["weights_id"] == uce["weights_id"]  # same base, same edit
    ours = erased.records[erased.records["method"] == "uce"]
    theirs = back.records[back.records["method"] == label]
    assert list(theirs["image_key"]) == list(ours["image_key"])  # the same images
    assert list(theirs["value"]) == list(ours["value"])
    # one base model: the two runs merge into one report
    merged = tmp_path / "merged"
    assert report_main([str(tmp_path / "uce"), str(tmp_path / "back"), "--out", str(merged)]) == 0
    assert {"uce", label} <= set(pd.read_csv(merged / "runs.csv")["method"])


def test_export_names_the_choices_on_bad_input(tmp_path: Path, cache_dir: Path, capsys) -> None:
    fia_bench.run(["method=uce", "seeds=2", "n_concepts=[1]", *FAST], out_dir=str(tmp_path / "r"))
    assert main([str(tmp_path / "r"), "--method", "esd", "--out", str(tmp_path / "x")]) == 2
    assert "valid: none, uce" in capsys.readouterr().err
    assert main([str(tmp_path / "r"), "--method", "uce", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "2 jobs match; choose one of: --n 1 --seed 0 (ok), --n 1 --seed 1 (ok)" in err
    assert "\n" not in err


def test_an_inference_time_method_has_nothing_to_export(tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    run.mkdir()
    rows = {"method": ["sld"], "n_concepts": [1], "seed": [0], "status": ["ok"]}
    pd.DataFrame(rows).to_csv(run / "runs.csv", index=False)
    (run / "manifest.json").write_text("{}")
    assert main([str(run), "--method", "sld", "--out", str(tmp_path / "x")]) == 2
    assert "changes sampling, not weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
