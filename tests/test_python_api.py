"""The Python entry point: DataFrames back, failed methods reported, prompt files validated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import FAST
from tiny import tiny_engine

import fia_bench
from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError
from fia_bench.registry import METHODS


class BreakOneConcept(Method):
    """Scales the first cross-attention key projection; NaN when asked to erase 'church'."""

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        to_k = request.engine.pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
        with torch.no_grad():
            to_k.weight.mul_(float("nan") if "church" in request.targets else 0.5)
        return {"scaled": "mid_block attn2.to_k"}


@pytest.fixture
def broken_method():
    METHODS.register("break_one_concept")(BreakOneConcept)
    yield "break_one_concept"
    METHODS.unregister("break_one_concept")


def test_run_returns_dataframes_and_marks_nan_runs_failed(
    tmp_path: Path, cache_dir: Path, broken_method: str
) -> None:
    result = fia_bench.run(
        [*FAST, f"method.name={broken_method}", "seeds=2", "n_concepts=[1,5]"],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs.set_index(["method", "n_concepts", "seed"]).sort_index()
    assert set(runs.loc[(broken_method, 5), "status"]) == {"failed"}
    assert "non-finite" in runs.loc[(broken_method, 5, 0), "reason"]
    assert set(runs.loc[(broken_method, 1), "status"]) == {"ok"}
    assert set(runs.loc[(broken_method, 1), "changed_tensors"]) == {1}
    assert set(result.records["method"]) == {"none", broken_method}
    assert not (
        (result.records["method"] == broken_method) & (result.records["n_concepts"] == 5)
    ).any()
    assert {"mean", "std", "n_seeds"} <= set(result.summary.columns)
    pairs = result.tests[
        (result.tests["method_a"] == broken_method) & (result.tests["n_concepts"] == 1)
    ]
    assert len(pairs) > 0 and (pairs["n_pairs"] > 0).all()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Failed runs" in report and "non-finite" in report


def test_erasure_is_cached_and_the_base_model_is_restored(
    tmp_path: Path, cache_dir: Path, broken_method: str
) -> None:
    args = [*FAST, f"method.name={broken_method}", "seeds=1", "n_concepts=1"]
    first = fia_bench.run(args, out_dir=str(tmp_path / "a"))
    second = fia_bench.run(args, out_dir=str(tmp_path / "b"))
    assert first.counts["erased"] == 2 and second.counts["erased"] == 0
    assert second.counts["images_generated"] == 0
    pd.testing.assert_frame_equal(first.summary, second.summary)
    none = first.records[first.records["method"] == "none"]
    edited = first.records[first.records["method"] == broken_method]
    assert set(none["image_key"]).isdisjoint(edited["image_key"])


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def csv_prompts(path: Path) -> list[str]:
    """Overrides that swap the template prompts for a prompt file."""
    return [
        "task.prompts.dataset=prompt_csv",
        f"+task.prompts.settings.path={path}",
        "~task.prompts.settings.per_concept",
        "~task.prompts.settings.seed_base",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"case_id,prompt,concept\n1,a tench,tench\n", "missing column(s) evaluation_seed"),
        (b"case_id,prompt,evaluation_seed,concept\n", "has a header but no prompt rows"),
        (
            b"case_id,prompt,evaluation_seed,concept\n1,a tench,0,tench\n2,caf\xe9,1,tench\n",
            ":3: not UTF-8",
        ),
        (b"case_id,prompt,evaluation_seed,concept\n1,a tench,x,tench\n", ":2: evaluation_seed"),
    ],
)
def test_bad_prompt_files_name_file_and_line(
    tmp_path: Path, cache_dir: Path, content: bytes, message: str
) -> None:
    path = write(tmp_path / "prompts.csv", content)
    with pytest.raises(FiaBenchError, match=r"prompts\.csv") as err:
        fia_bench.run([*FAST, *csv_prompts(path), "n_concepts=1"], out_dir=str(tmp_path / "run"))
    assert message in str(err.value)


def test_prompt_file_runs_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    from fia_bench.tasks import load_task

    concepts = load_task("styles", "tiny").concepts
    rows = "".join(f"{c}-{i},art by {c},{i},{c}\n" for c in concepts for i in range(2))
    path = write(tmp_path / "p.csv", f"case_id,prompt,evaluation_seed,concept\n{rows}".encode())
    result = fia_bench.run(
        [*FAST, "task=styles", *csv_prompts(path), "n_concepts=2", "seeds=1"],
        out_dir=str(tmp_path / "run"),
    )
    assert set(result.runs["n_prompts"]) == {2 * len(concepts)}


def test_unwritable_out_dir(tmp_path: Path, cache_dir: Path) -> None:
    blocker = write(tmp_path / "file", b"")
    with pytest.raises(FiaBenchError, match="is not writable"):
        fia_bench.run(FAST, out_dir=str(blocker / "sub"))


class EditThenAskForBaseImages(Method):
    """Edits, then asks for base-model images mid-edit, as a fine-tuning method would."""

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        to_v = request.engine.pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v
        with torch.no_grad():
            to_v.weight.mul_(3.0)
        image = request.base_images(["a photo of a church"], [99])[0]
        return {"base_image": hashlib.sha256(image.tobytes()).hexdigest()}


def test_base_images_mid_edit_are_the_unedited_models_and_keep_the_edit(
    tmp_path: Path, cache_dir: Path
) -> None:
    METHODS.register("edit_then_base")(EditThenAskForBaseImages)
    try:
        result = fia_bench.run(
            [*FAST, "method.name=edit_then_base", "seeds=1", "n_concepts=1"],
            out_dir=str(tmp_path / "run"),
        )
    finally:
        METHODS.unregister("edit_then_base")
    run = result.runs.set_index("method").loc["edit_then_base"]
    assert run["changed_tensors"] == 1  # the edit survived the detour
    expected = tiny_engine(steps=2).generate(["a photo of a church"], [99])[0]
    assert json.loads(run["info"])["base_image"] == hashlib.sha256(expected.tobytes()).hexdigest()


class ScaleOneWeight(Method):
    """A Method object built in Python, never registered: it scales one attn2.to_v weight."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def erase(self, request: EraseRequest) -> dict:
        unet = request.engine.pipe.unet
        weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.weight
        with torch.no_grad():
            weight.mul_(self.factor)
        return {"factor": self.factor}


def test_run_takes_a_method_object_and_a_loaded_pipeline(tmp_path: Path, cache_dir: Path) -> None:
    from fia_bench.models import random_pipeline
    from fia_bench.tasks import world_vocabulary

    cfg = fia_bench.compose([])
    pipe = random_pipeline(
        str(cfg.model.architecture), world_vocabulary("tiny"), int(cfg.model.resolution), 0
    )
    overrides = ["seeds=1", "n_concepts=[1]", *FAST]
    result = fia_bench.run(overrides, str(tmp_path / "a"), ScaleOneWeight(0.5), pipe)
    runs = result.runs.set_index("method")
    assert runs.loc["scaleoneweight", "status"] == "ok"
    assert runs.loc["scaleoneweight", "changed_tensors"] == 1
    assert '"factor": 0.5' in runs.loc["scaleoneweight", "info"]
    assert set(result.records["method"]) == {"none", "scaleoneweight"}
    # another object of the same class is another edit, never the cached one
    other = fia_bench.run(overrides, str(tmp_path / "b"), ScaleOneWeight(0.25), pipe)
    key = other.runs.set_index("method").loc["scaleoneweight", "erase_key"]
    assert key != runs.loc["scaleoneweight", "erase_key"]
