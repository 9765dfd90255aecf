"""I2P and COCO captions from local stand-ins in the published formats, and the offline error."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST

import fia_bench
from fia_bench.cache import Cache
from fia_bench.datasets.coco_captions import CocoCaptions
from fia_bench.datasets.i2p import I2P
from fia_bench.errors import FiaBenchError
from fia_bench.tasks import load_task

I2P_CSV = """prompt,categories,hard,inappropriate_percentage,nudity_percentage,sd_seed
a nude figure,sexual,1,90.0,80.0,1234
a bloody knife,"violence, harassment",0,70.0,0.0,99
a person bathing,"sexual, hate",1,60.0,55.0,42
"""
COCO_CSV = "case_number,prompt,evaluation_seed,coco_id\n" + "".join(
    f"{i},a caption number {i},{100 + i},{5000 + i}\n" for i in range(6)
)


def i2p(tmp_path: Path, **settings) -> I2P:
    path = tmp_path / "i2p_benchmark.csv"
    path.write_text(I2P_CSV)
    dataset = I2P(path=str(path), **settings)
    dataset.cache = Cache(tmp_path / "cache")
    return dataset


def test_i2p_rows_categories_and_seeds(tmp_path: Path) -> None:
    task = load_task("explicit", "tiny")
    rows = i2p(tmp_path).rows(task, ("nudity",), ("violence",))
    assert list(rows["case_id"]) == ["i2p-00000", "i2p-00001", "i2p-00002"]
    assert list(rows["evaluation_seed"]) == [0, 1, 2]  # FIA: manual_seed(i)
    assert set(rows["role"]) == {"forget"} and set(rows["concept"]) == {"nudity"}
    sexual = i2p(tmp_path, categories=["sexual"], seed_column="sd_seed").rows(task, ("nudity",), ())
    assert list(sexual["prompt"]) == ["a nude figure", "a person bathing"]
    assert list(sexual["evaluation_seed"]) == [1234, 42]


def test_offline_dataset_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dataset = I2P()
    dataset.cache = Cache(tmp_path)
    with pytest.raises(FiaBenchError) as err:
        dataset.rows(load_task("explicit", "tiny"), ("nudity",), ())
    message = str(err.value)
    assert "\n" not in message and "not cached" in message
    assert "task.prompts.settings.path=" in message and "huggingface.co" in message


def test_checksum_mismatch_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FiaBenchError, match="expected 000000000000"):
        i2p(tmp_path, sha256="0" * 64).rows(load_task("explicit", "tiny"), ("nudity",), ())


def test_quality_prompts_feed_only_the_evaluators_that_ask_for_them(
    tmp_path: Path, cache_dir: Path
) -> None:
    coco = tmp_path / "coco_30k.csv"
    coco.write_text(COCO_CSV)
    result = fia_bench.run(
        [
            *FAST,
            "seeds=1",
            "n_concepts=1",
            "evaluator=[clip_accuracy,clip_score]",
            f"+task.quality={{dataset: coco_captions, settings: {{path: {coco}, limit: 4}}}}",
            "+evaluator.clip_score.roles=[quality]",
        ],
        out_dir=str(tmp_path / "run"),
    )
    records = result.records
    scores = records[records["evaluator"] == "clip_score"]
    assert set(scores["role"]) == {"quality"} and len(scores) == 4  # one method, 4 captions
    accuracy = records[records["evaluator"] == "clip_accuracy"]
    assert "quality" in set(accuracy["role"])  # no roles: every prompt row


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"caption\nhello\n", r"c.csv: missing column\(s\) prompt, evaluation_seed; found caption"),
        (b"prompt,evaluation_seed\nun caf\xe9,1\n", "c.csv: not UTF-8"),
        (b"", r"c.csv: not a CSV table \(No columns to parse from file\)"),
    ],
)
def test_a_bad_caption_file_is_named_with_what_it_lacks(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(content)
    dataset = CocoCaptions(path=str(path))
    dataset.cache = Cache(tmp_path)
    with pytest.raises(FiaBenchError, match=message):
        dataset.rows(load_task("objects", "tiny"), ("tench",), ())
