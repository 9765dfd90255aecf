"""``make bench``: the GPU-hour arithmetic against hand-computed counts, and the benchmark's
code paths end to end at tiny scale."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST
from tiny import tiny_engine, toy_recipe

from benchmarks import erasure, generation, miniworld_train, projection
from benchmarks.__main__ import concept_counts, main, method_overrides
from fia_bench.errors import FiaBenchError
from fia_bench.miniworld.build_files import TRAINED, recipe, weights_dir
from fia_bench.miniworld.loop import cycles_of

PROTOCOL = projection.load_protocol()
METHODS = ["fia", "uce", "esd", "scapre", "dynamic_mask"]
TRAINING = {"dynamic_mask": 200}


def test_images_per_model_are_the_papers_sets() -> None:
    tables = PROTOCOL["tables"]
    assert projection.images_per_model(tables["table1"]["images"]) == 10 * 500 + 30_000
    assert projection.images_per_model(tables["table3"]["images"]) == 4_703 + 30_000


@pytest.mark.parametrize(
    ("per_model", "n", "cached", "expected"),
    [
        # Table 1: 25 jobs, each the edited and the reference model's 35,000 images, plus
        # Dynamic Mask's 200 training images for each of 10 concepts in each of its 5 jobs
        (35_000, 10, False, (875_000, 875_000, 10_000)),
        # cached: the reference once; FIA and UCE once each, ESD/ScaPre/Dynamic Mask per seed
        # (1 + 1 + 5 + 5 + 5 = 17 edits); training images once
        (35_000, 10, True, (35_000, 595_000, 2_000)),
        (34_703, 1, False, (867_575, 867_575, 1_000)),
        (34_703, 1, True, (34_703, 589_951, 200)),
    ],
)
def test_image_counts_match_hand_computed(
    per_model: int, n: int, cached: bool, expected: tuple[int, int, int]
) -> None:
    counts = projection.image_counts(per_model, n, METHODS, 5, ["fia", "uce"], TRAINING, cached)
    assert (counts.reference, counts.edited, counts.training) == expected
    assert counts.total == sum(expected)


def test_shipped_training_lengths() -> None:
    assert projection.training_lengths() == {
        "esd_iterations": 1000,
        "dynamic_mask_steps_per_concept": 10 * 50,
        "dynamic_mask_images_per_concept": 200,
    }


TIMING = {
    "fia_s_per_concept": 2.0,
    "uce_s": {"10": 1.0, "50": 3.0},
    "scapre_s": {"50": 9.0, "10": 1.0},
    "esd_s_per_step": 0.1,
    "dynamic_mask_s_per_step": 0.2,
}
LENGTHS = {
    "esd_iterations": 1000,
    "dynamic_mask_steps_per_concept": 500,
    "dynamic_mask_images_per_concept": 200,
}


def test_erase_seconds_per_method() -> None:
    seconds = {m: projection.erase_seconds(m, 10, TIMING, LENGTHS) for m in METHODS}
    assert seconds == pytest.approx(
        {"fia": 20.0, "uce": 1.0, "esd": 100.0, "scapre": 1.0, "dynamic_mask": 1000.0}
    )
    assert projection.erase_seconds("uce", 30, TIMING, LENGTHS) == pytest.approx(2.0)
    assert projection.erase_seconds("scapre", 1, TIMING, LENGTHS) == 0.0  # the line, floored
    with pytest.raises(FiaBenchError, match="unknown method 'sld'"):
        projection.erase_seconds("sld", 1, TIMING, LENGTHS)


def test_projection_hours() -> None:
    rows = projection.project(PROTOCOL, {"naive": 0.5, "engine": 5.0}, TIMING, LENGTHS)
    by = {(r["table"], r["regime"]): r for r in rows}
    cached = by[("table1", "engine + cache")]
    assert cached["images"] == 35_000 + 595_000 + 2_000
    assert cached["generate_h"] == pytest.approx(632_000 / 5.0 / 3600)
    # 5 seeds x (FIA 20 + UCE 1 + ESD 100 + ScaPre 1 + Dynamic Mask 1000 s)
    assert cached["erase_h"] == pytest.approx(5 * 1122 / 3600)
    naive = by[("table3", "naive loop, no cache")]
    assert naive["generate_h"] == pytest.approx((2 * 867_575 + 1_000) / 0.5 / 3600)
    # one concept: UCE 1 - 2 * 9/40 = 0.55 s on its line, ScaPre's line floored at 0
    assert naive["erase_h"] == pytest.approx(5 * (2 + 0.55 + 100 + 0 + 100) / 3600)
    assert (
        naive["total_h"]
        > by[("table3", "engine, no cache")]["total_h"]
        > by[("table3", "engine + cache")]["total_h"]
    )


def test_concept_counts_parse_and_reject() -> None:
    assert concept_counts("10,50") == (10, 50)
    for bad in ("10", "10,10", "0,5", "a,5", "1,2,3"):
        with pytest.raises(FiaBenchError, match="--concepts takes two different counts"):
            concept_counts(bad)


def test_method_overrides_parse_and_reject() -> None:
    assert method_overrides(["fia.saliency_steps=1", "esd.train=esd-x", "fia.noise_seed=null"]) == {
        "fia": {"saliency_steps": 1, "noise_seed": None},
        "esd": {"train": "esd-x"},
    }
    with pytest.raises(FiaBenchError, match=r"METHOD\.KEY=VALUE"):
        method_overrides(["saliency_steps=1"])


def test_the_timed_methods_and_their_settings_are_checked_before_any_model_is_built() -> None:
    erasure.check_methods({"fia": {"saliency_steps": 1}, "esd": {"train": "esd-x"}})
    with pytest.raises(FiaBenchError, match=r"unknown timed method 'fiaa' in --set.*'fia'"):
        erasure.check_methods({"fiaa": {"saliency_steps": 1}})
    with pytest.raises(FiaBenchError, match="unknown setting 'saliency_stepz' in --set fia"):
        erasure.check_methods({"fia": {"saliency_stepz": 1}})


def test_method_timings_through_the_plugins() -> None:
    """Every method erases through its plugin on a tiny engine with the SD world's tasks;
    Dynamic Mask trains exactly the asked steps, and its image making is timed apart."""
    small = {
        "fia": {"saliency_steps": 1, "inference_steps": 2, "placeholders_per_concept": 1},
        "scapre": {"entropy_samples": 2, "mi_samples": 1},
        "esd": {"ddim_steps": 2, "train": "esd-x"},
        "dynamic_mask": {},
    }
    lines: list[str] = []
    kept: list[list[str]] = []  # the figures handed over after each method, as they stood

    def keep(figures: dict[str, object]) -> None:
        kept.append(list(figures))

    timing = erasure.time_methods(tiny_engine(), 3, (1, 2), small, lines.append, keep)
    assert [k[-1] for k in kept] == ["fia_s_per_concept", "uce_s", "scapre_s", "esd_train_set"]
    assert all(set(a) < set(b) < set(timing) for a, b in itertools.pairwise(kept))
    assert set(timing["uce_s"]) == set(timing["scapre_s"]) == {"1", "2"}
    assert timing["esd_train_set"] == "esd-x"
    assert timing["dynamic_mask_training_images_s"] > 0
    for key in ("fia_s_per_concept", "esd_s_per_step", "dynamic_mask_s_per_step"):
        assert timing[key] > 0, key
    assert any(line.startswith("dynamic_mask: ") and " for 3 steps " in line for line in lines)


def test_tiny_bench_writes_json_and_markdown(tmp_path: Path, cache_dir: Path) -> None:
    job = [f"--job={o}" for o in [*FAST, "n_concepts=[1]", "seeds=1"]]
    main(["--images", "4", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path), *job])
    result = json.loads((tmp_path / "bench_cpu.json").read_text())
    gen = result["generation"]
    assert gen["batch_size"] == 2 and gen["images"] == 4 and gen["precision"] == "fp32"
    assert gen["speedup"] == pytest.approx(gen["engine_images_per_s"] / gen["naive_images_per_s"])
    assert gen["batched_batch_size"] == 2 and gen["batched_images_per_s"] > 0
    assert gen["engine_share_of_peak"] == pytest.approx(
        gen["engine_images_per_s"] * gen["flops_per_image"] / gen["gemm_peak_flops"]
    )
    assert result["harness"]["cold_s"] > 0 and result["machine"]["device"] == "cpu"
    guided = result["guidance"]
    assert set(guided) == {"unguided", "sld", "safree"} and guided["unguided"]["ratio"] == 1
    assert all(r["seconds"] > 0 and r["images"] == 4 for r in guided.values())
    text = (tmp_path / "bench_cpu.md").read_text()
    assert "naive diffusers loop" in text and "python -m benchmarks --images 4" in text
    assert "× unguided" in text
    assert "one batched call" in text and "of that peak" in text
    with pytest.raises(SystemExit, match="--batch-size must be 'auto' or a positive integer"):
        main(["--batch-size", "0", "--out", str(tmp_path)])


def test_flops_per_image_are_one_unet_call_per_step_beside_fixed_costs() -> None:
    """The FLOP count behind the share of peak: one more sampling step adds exactly one UNet call
    on the conditional and unconditional latents (classifier-free guidance in one batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    per_steps = {k: generation.flops_per_image(tiny_engine(steps=k), "tiny") for k in (2, 3)}
    engine = tiny_engine()
    latents, text = torch.zeros(2, *engine.latent_shape), engine.encode(["a", ""])
    with FlopCounterMode(display=False) as counter:
        engine.pipe.unet(latents, 10, encoder_hidden_states=text)
    assert per_steps[3] - per_steps[2] == counter.get_total_flops() > 0


def test_the_training_projection_adds_fixed_and_per_step_costs(tmp_path: Path) -> None:
    """One toy build of 4 steps per stage; the shipped weights are never written."""
    shipped = {p: p.stat().st_mtime_ns for p in weights_dir().rglob("*") if p.is_file()}
    toy = recipe(toy_recipe(tmp_path))
    assert miniworld_train.shortened(toy, 7)["generator"] == {**toy["generator"], "steps": 7}
    result = miniworld_train.time_recipe(2, "cpu", tmp_path / "recipe.yaml", work=tmp_path)
    rows = {r["stage"]: r for r in result["stages"]}
    assert list(rows) == ["data", *TRAINED, "export"]
    for stage in TRAINED:
        r = rows[stage]
        halfway, end = r["step_clock_s"]
        assert 0 < halfway < end <= r["timed_s"]
        assert r["recipe_steps"] == sum(cycles_of(toy[stage]["steps"]))
        assert r["s_per_step"] == pytest.approx((end - halfway) / 2)
        assert r["fixed_s"] + 4 * r["s_per_step"] == pytest.approx(r["timed_s"])
        assert r["projected_s"] == pytest.approx(r["fixed_s"] + r["recipe_steps"] * r["s_per_step"])
    assert result["projected_minutes"] * 60 == pytest.approx(
        sum(r["projected_s"] for r in rows.values())
    )
    assert rows["generator"]["recipe_steps"] == 3 and rows["data"]["projected_s"] > 0
    assert "Projected whole build" in "\n".join(miniworld_train.markdown(result, on_cuda=False))
    assert {p: p.stat().st_mtime_ns for p in weights_dir().rglob("*") if p.is_file()} == shipped
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]  # the builds were thrown away
    first_half_free = {"fixed_s": -0.04 * 10 * 2.0, "s_per_step": 2.0}  # 4% slower at the end
    assert not miniworld_train.too_noisy(first_half_free, 10)
    assert miniworld_train.too_noisy({**first_half_free, "fixed_s": -0.06 * 10 * 2.0}, 10)
    with pytest.raises(FiaBenchError, match="--stage-steps must be a positive"):
        miniworld_train.time_recipe(0, "cpu")


def test_the_generator_step_profile_times_every_phase_of_a_step(tmp_path: Path) -> None:
    from benchmarks import generator_step

    result, table = generator_step.measure("cpu", 2, toy_recipe(tmp_path))
    phases = result["phase_ms_synchronised"]
    assert list(phases) == list(generator_step.PHASES) and all(v >= 0 for v in phases.values())
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["adamw"] > 0
    assert result["kernel_launches_per_step"] == 0  # no device kernels on a CPU
    assert result["host_ms_per_step_profiled"] > 0 and "aten::" in table
