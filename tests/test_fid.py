"""FID: both libraries agree on identical features, the distance has its closed-form values, and
the evaluator runs against the base model and against a cached reference folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import FAST
from PIL import Image

import fia_bench
from fia_bench.errors import FiaBenchError
from fia_bench.evaluators.fid import frechet, torchmetrics_fid


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_clean_fid_and_torchmetrics_agree_on_identical_features() -> None:
    a, b = gaussian(300, 16, 0), gaussian(300, 16, 1) * 1.5 + 0.3
    ours, theirs = frechet(a, b), torchmetrics_fid(a, b)
    assert ours > 1.0
    assert theirs == pytest.approx(ours, rel=1e-6)


def test_a_shift_costs_its_squared_length_and_a_set_costs_nothing_against_itself() -> None:
    a = gaussian(200, 8, 2)
    shift = torch.tensor([0.5, -1.0, 0, 0, 2.0, 0, 0, 0], dtype=torch.float64)
    assert frechet(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-6)


def fid_rows(result) -> pd.DataFrame:
    return result.records[result.records["evaluator"] == "fid"].set_index(["method", "metric"])


def test_fid_against_the_base_model(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [*FAST, "method=uce", "evaluator=[fid]", "seeds=1", "n_concepts=1"],
        out_dir=str(tmp_path / "run"),
    )
    rows = fid_rows(result)
    assert set(rows["prompt_id"]) == {"*"} and set(rows["role"]) == {"all"}
    assert rows.loc[("none", "fid"), "value"] == pytest.approx(0.0, abs=1e-6)
    assert rows.loc[("uce", "fid"), "value"] > 0
    assert rows.loc[("uce", "fid_torchmetrics"), "value"] == pytest.approx(
        rows.loc[("uce", "fid"), "value"], rel=1e-4
    )
    assert result.counts["images_generated"] == 40  # the reference reuses the base images


def test_fid_against_a_folder_caches_its_features(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 255 - 20 * i, 90)).save(folder / f"{i:02d}.png")
    args = [
        *FAST,
        "evaluator=[fid]",
        "seeds=1",
        "n_concepts=1",
        f"evaluator.fid.settings.reference={folder}",
    ]
    first = fia_bench.run(args, out_dir=str(tmp_path / "a"))
    assert len(list((cache_dir / "fid_reference").rglob("*.safetensors"))) == 1
    assert fid_rows(first).loc[("none", "fid"), "value"] > 0
    (folder / "extra.png").write_bytes((folder / "00.png").read_bytes())
    fia_bench.run(args, out_dir=str(tmp_path / "b"))
    assert len(list((cache_dir / "fid_reference").rglob("*.safetensors"))) == 2


def test_missing_reference_folder_is_one_clear_error(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(FiaBenchError, match="give 'base' or an existing folder"):
        fia_bench.run(
            [*FAST, "evaluator=[fid]", f"evaluator.fid.settings.reference={tmp_path}/x"],
            out_dir=str(tmp_path / "run"),
        )
