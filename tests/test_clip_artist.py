"""CLIP_a and FSR: FSR is exactly 'edited image less similar than the base image of the same
prompt and seed', checked against the reference method's own CLIP_a."""

from __future__ import annotations

from pathlib import Path

from conftest import FAST

import fia_bench


def test_fsr_compares_with_the_base_image_of_the_same_prompt_and_seed(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = fia_bench.run(
        [*FAST, "task=styles", "method=uce", "seeds=2", "n_concepts=2", "evaluator=[clip_artist]"],
        out_dir=str(tmp_path / "run"),
    )
    records = result.records
    wide = records.pivot_table(
        index=["seed", "prompt_id"], columns=["method", "metric"], values="value"
    )
    assert (wide[("none", "fsr")] == 0).all()
    expected = 100.0 * (wide[("uce", "clip_a")] < wide[("none", "clip_a")])
    assert (wide[("uce", "fsr")] == expected).all()
    assert set(records["role"]) == {"forget", "retain"}
