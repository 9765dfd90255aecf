"""ConceptPrune: only the masked Linear's weights change, to zero, exactly where the skilled-neuron
rule (recomputed here from stored activations) says; several concepts prune the union of their
masks; select_ratio and batching behave; and a harness run end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST as FAST_RUN
from conftest import REPO
from tiny import tiny_engine

import fia_bench
from fia_bench import artifacts
from fia_bench.api import EraseRequest
from fia_bench.errors import FiaBenchError
from fia_bench.records import registered_name
from fia_bench.tasks import load_task
from methods.conceptprune import ConceptPrune, row_top_mask

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/conceptprune.yaml").read_text())["settings"]
# A short schedule, four placeholders and a larger skill ratio keep it to a few UNet calls.
QUICK = {"inference_steps": 4, "timesteps": 2, "skill_ratio": 0.1}


def quick_tasks(n_places: int = 4) -> dict:
    tasks = copy.deepcopy(SETTINGS["tasks"])
    for spec in tasks.values():
        spec["placeholders"] = spec["placeholders"][:n_places]
    return tasks


def prune_method(**overrides) -> ConceptPrune:
    return ConceptPrune(**(SETTINGS | QUICK | {"tasks": quick_tasks()} | overrides))


def request(engine, targets, seed: int = 0) -> EraseRequest:
    retain = tuple(c for c in TASK.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, seed, TASK, engine)


def stored_inputs(engine, prompts, suffix: str, steps: int = 4, stop_after: int = 2):
    """Every masked Linear's input at each of the first steps, one prompt at a time, with seed 0:
    {layer: [step][prompt]} of (rows, C_in)."""
    unet = engine.pipe.unet
    layers = {n: m for n, m in unet.named_modules() if n.endswith(suffix)}
    store = {n: [[] for _ in range(stop_after)] for n in layers}
    step = {"t": -1}
    handles = [unet.register_forward_pre_hook(lambda *_: step.update(t=step["t"] + 1))]
    for name, module in layers.items():
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, name=name: store[name][step["t"]].append(
                    args[0].detach().double().reshape(-1, args[0].shape[-1]).clone()
                )
            )
        )
    try:
        for p in prompts:
            step["t"] = -1
            engine.sample_latents([p], [0], steps=steps, guidance_scale=7.5, stop_after=stop_after)
    finally:
        for h in handles:
            h.remove()
    return layers, store


def expected_mask(engine, concept: str, ratio: float, suffix: str = "ff.net.2") -> dict:
    """The skilled-neuron rule written out entry by entry from stored activations: at some step,
    among the row's top ⌊ratio·C_in⌋ Wanda scores of the concept and above the base's score."""
    places = SETTINGS["tasks"]["objects"]["placeholders"][:4]
    concept_prompts = [f"a {concept} in a {p}" for p in places]
    base_prompts = [f"a {p}" for p in places]
    layers, concept_x = stored_inputs(engine, concept_prompts, suffix)
    _, base_x = stored_inputs(engine, base_prompts, suffix)
    masks = {}
    for name, module in layers.items():
        w = module.weight.detach().double().abs()
        k = int(ratio * w.shape[1])
        mask = torch.zeros_like(w, dtype=torch.bool)
        for t in range(2):
            rows_c = torch.cat(concept_x[name][t])
            rows_b = torch.cat(base_x[name][t])
            n_c = (rows_c / rows_c.norm(dim=1, keepdim=True)).norm(dim=0)
            n_b = (rows_b / rows_b.norm(dim=1, keepdim=True)).norm(dim=0)
            for i in range(w.shape[0]):
                score_c, score_b = w[i] * n_c, w[i] * n_b
                top = sorted(range(w.shape[1]), key=lambda j: (-score_c[j].item(), j))[:k]
                for j in top:
                    if score_c[j] > score_b[j]:
                        mask[i, j] = True
        masks[name] = mask
    return masks


def test_only_ffn2_weights_change_to_zero_exactly_on_the_skilled_neurons() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    expected = expected_mask(engine, "tench", 0.1)
    info = prune_method().erase(request(engine, ["tench"]))
    delta, non_finite = artifacts.extract(engine.pipe, base)
    names = sorted(f"unet.{n}.weight" for n in expected)
    assert not non_finite and len(names) == 4
    assert delta.changed == names  # every FFN2 weight, no bias, nothing else
    assert set(delta.tensors) == {artifacts.ZERO + n for n in names}  # zeroing only
    for name, mask in expected.items():
        full = f"unet.{name}.weight"
        assert mask.any() and not mask.all()
        assert torch.equal(delta.tensors[artifacts.ZERO + full], mask & (base[full] != 0))
    pruned = sum(int(m.sum()) for m in expected.values())
    assert info["pruned_connections"] == pruned == sum(delta.changed_counts(base).values())
    assert info["selected_per_concept"] == {"tench": pruned}
    ffn2 = sum(base[n].numel() for n in names)
    assert info["layer_weights"] == ffn2 and info["sparsity_layer"] == pytest.approx(pruned / ffn2)


def test_the_layer_switch_masks_that_linear_and_nothing_else() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    expected = expected_mask(engine, "tench", 0.1, "attn2.to_v")  # input: the text states
    prune_method(layer="attn2.to_v").erase(request(engine, ["tench"]))
    delta, _ = artifacts.extract(engine.pipe, base)
    assert delta.changed == sorted(f"unet.{n}.weight" for n in expected)
    for name, mask in expected.items():
        full = f"unet.{name}.weight"
        assert torch.equal(delta.tensors[artifacts.ZERO + full], mask & (base[full] != 0))


def test_several_concepts_prune_the_union_of_their_masks() -> None:
    engine = tiny_engine()
    targets = TASK.concepts[:3]
    union, info = prune_method().plan(request(engine, targets))
    singles = [prune_method().plan(request(engine, [c]))[0] for c in targets]
    for name, mask in union.items():
        assert torch.equal(mask, singles[0][name] | singles[1][name] | singles[2][name])
    assert any(not torch.equal(singles[0][n], singles[1][n]) for n in union)
    assert info["pruned_connections"] == sum(int(m.sum()) for m in union.values())
    assert info["pruned_connections"] < sum(info["selected_per_concept"].values())  # overlaps


def test_select_ratio_keeps_the_connections_skilled_at_more_steps() -> None:
    engine = tiny_engine()
    method = prune_method(timesteps=4)
    any_step, _ = method.plan(request(engine, ["tench"]))
    every_step, _ = prune_method(timesteps=4, select_ratio=0.75).plan(request(engine, ["tench"]))
    assert all(not (every_step[n] & ~any_step[n]).any() for n in any_step)
    assert sum(int(m.sum()) for m in every_step.values()) < sum(
        int(m.sum()) for m in any_step.values()
    )


def test_batching_does_not_change_the_mask() -> None:
    engine = tiny_engine()
    one, _ = prune_method(batch_size=1).plan(request(engine, ["tench"]))
    four, _ = prune_method(batch_size=4).plan(request(engine, ["tench"]))
    assert all(torch.equal(one[n], four[n]) for n in one)


def test_row_top_mask_breaks_ties_toward_the_lower_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    top_two = [[False, True, True, False], [True, True, False, False]]
    assert row_top_mask(scores, 2).tolist() == top_two
    assert not row_top_mask(scores, 0).any()  # ⌊ratio·C_in⌋ = 0 selects nothing, as the code


def test_empty_targets_and_bad_settings() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    assert prune_method().erase(request(engine, []))["pruned_connections"] == 0
    assert artifacts.extract(engine.pipe, base)[0].changed == []
    with pytest.raises(FiaBenchError, match=r"attn2\.to_v"):
        ConceptPrune(layer="ffn3")
    with pytest.raises(FiaBenchError, match="timesteps=60"):
        ConceptPrune(timesteps=60)
    with pytest.raises(FiaBenchError, match=r"tasks.objects: needs concept_prompt"):
        ConceptPrune(tasks={"objects": {"concept_prompt": "a {concept}"}}).prompt_set("objects")
    with pytest.raises(FiaBenchError, match=r"prompt set for task 'objects'.*valid choices"):
        ConceptPrune(tasks={}).prompt_set("objects")


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [
            *FAST_RUN,
            "method=conceptprune",
            "seeds=1",
            "n_concepts=[1,2]",
            "method.settings.inference_steps=4",
            "method.settings.timesteps=2",
            "method.settings.skill_ratio=0.1",
        ],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs[result.runs["method"].map(registered_name) == "conceptprune"].set_index(
        "n_concepts"
    )
    assert set(runs["status"]) == {"ok"}
    for n in (1, 2):
        info = json.loads(runs.loc[n, "info"])
        assert len(info["selected_per_concept"]) == n and info["pruned_connections"] > 0
        assert runs.loc[n, "changed_entries"] == info["pruned_connections"]
        assert runs.loc[n, "changed_tensors"] == 4
    assert {"conceptprune", "none"} == set(result.records["method"].map(registered_name))
