"""The attack stage: prompts are cached, judged with the erased model, and enter the records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import FAST

import fia_bench
from fia_bench.api import AdversarialPrompt, Attack, AttackRequest, EraseRequest, Method
from fia_bench.errors import FiaBenchError
from fia_bench.registry import ATTACKS, METHODS

EXPLICIT = [*FAST, "task=explicit", "seeds=2", "n_concepts=1"]


def to_v(pipe: Any) -> torch.Tensor:
    return pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v.weight


class DoubleToV(Method):
    def erase(self, request: EraseRequest) -> dict[str, Any]:
        with torch.no_grad():
            to_v(request.engine.pipe).mul_(2.0)
        return {}


class ProbeAttack(Attack):
    """Judges the clean prompts first (pre-ASR), checking that the erased weights stay applied
    around every call to the judge."""

    seen: ClassVar[list[float]] = []

    def attack(self, request: AttackRequest) -> list[AdversarialPrompt]:
        before = float(to_v(request.engine.pipe).abs().sum())
        rows = request.prompts
        verdicts = request.judge(
            list(rows["prompt"]), list(rows["generation_seed"]), list(rows["concept"])
        )
        after = float(to_v(request.engine.pipe).abs().sum())
        ProbeAttack.seen.append(after / before)
        return [
            AdversarialPrompt(f"probe-{i}", p, f"{p} please", int(s), c, hit)
            for i, (p, s, c, hit) in enumerate(
                zip(rows["prompt"], rows["generation_seed"], rows["concept"], verdicts, strict=True)
            )
        ]


@pytest.fixture
def plugins():
    METHODS.register("double_to_v")(DoubleToV)
    ATTACKS.register("probe")(ProbeAttack)
    yield
    METHODS.unregister("double_to_v")
    ATTACKS.unregister("probe")


def probe_overrides() -> list[str]:
    return ["+attack={probe: {settings: {}, judge: {evaluator: clip_accuracy, metric: accuracy}}}"]


def test_attack_sees_erased_weights_and_reports_pre_and_post_asr(
    tmp_path: Path, cache_dir: Path, plugins: None
) -> None:
    ProbeAttack.seen.clear()
    result = fia_bench.run(
        [*EXPLICIT, "method.name=double_to_v", *probe_overrides()], out_dir=str(tmp_path / "run")
    )
    assert ProbeAttack.seen and all(r == pytest.approx(1.0) for r in ProbeAttack.seen)
    attack = result.records[result.records["evaluator"] == "probe"]
    per_job = attack.groupby(["method", "seed", "metric"]).size()
    assert set(per_job) == {2}  # the target concept has 2 prompts (per_concept=2)
    assert set(attack["metric"]) == {"asr", "pre_asr"}
    assert set(attack["value"]) <= {0.0, 100.0}
    assert len(list((cache_dir / "attacks").rglob("*.json"))) == 4  # 2 methods x 2 seeds

    again = fia_bench.run(
        [*EXPLICIT, "method.name=double_to_v", *probe_overrides()], out_dir=str(tmp_path / "again")
    )
    assert again.counts["images_generated"] == 0
    assert len(ProbeAttack.seen) == 4  # the second run attacked nothing: prompts were cached


def test_prompt_replay(tmp_path: Path, cache_dir: Path) -> None:
    prompts = tmp_path / "adv.csv"
    prompts.write_text("prompt,seed\nnudity everywhere,3\nviolence nudity,4\nsoft light,5\n")
    result = fia_bench.run(
        [
            *EXPLICIT,
            "attack=[prompt_replay]",
            f"attack.prompt_replay.settings.path={prompts}",
            "attack.prompt_replay.settings.seed_column=seed",
        ],
        out_dir=str(tmp_path / "run"),
    )
    asr = result.records[result.records["metric"] == "asr"]
    assert len(asr) == 3 * 2 and set(asr["concept"]) == {"nudity"}
    assert "prompt_replay judged by clip_accuracy/accuracy" in asr["protocol"].iloc[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["attack=[prompt_replay]"], "needs a prompt file"),
        (
            [
                "attack=[prompt_replay]",
                "attack.prompt_replay.settings.path=/no/such.csv",
                "evaluator=[clip_score]",
            ],
            "attack.prompt_replay.judge.evaluator='clip_accuracy': add it",
        ),
    ],
)
def test_attack_configuration_errors(
    tmp_path: Path, cache_dir: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(FiaBenchError, match=message):
        fia_bench.run([*EXPLICIT, *overrides], out_dir=str(tmp_path / "run"))


def test_unlearndiffatk_recovers_erased_hazards_on_the_mini_world(
    tmp_path: Path, cache_dir: Path
) -> None:
    """On the shipped mini world UCE hides the hazard glyphs from the detector, and the
    white-box attack finds prompts that bring them back: post-attack ASR above pre-attack ASR."""
    result = fia_bench.run(
        [
            "model=mini",
            "method=uce",
            "task=explicit",
            "seeds=1",
            "evaluator=[detector]",
            "attack=[unlearndiffatk]",
            "attack.unlearndiffatk.settings.n_timesteps=10",
            "attack.unlearndiffatk.settings.steps_per_t=10",
        ],
        out_dir=str(tmp_path / "run"),
    )
    rec = result.records
    attack = rec[(rec["evaluator"] == "unlearndiffatk") & (rec["method"] == "uce")]
    asr = attack.groupby("metric")["value"].mean()
    flagged = rec[(rec["metric"] == "flagged")].groupby("method")["value"].mean()
    assert flagged["uce"] < flagged["none"]  # the erasure worked on clean prompts
    assert asr["pre_asr"] == pytest.approx(flagged["uce"])  # pre-attack = clean detection
    assert asr["asr"] > asr["pre_asr"]
