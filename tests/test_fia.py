"""FIA: only ff.net.2 weights (or the Linear ``layer`` names) change, to zero, exactly on the fused
mask; Eq. 8's threshold and the single-concept rule; running sums equal the saliency computed from
stored activations; the selection helpers; determinism; and a harness run end to end."""

from __future__ import annotations

import copy
import itertools
import json
import math
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
from methods.fia import (
    FIA,
    LAYERS,
    agnostic_threshold,
    fuse,
    select,
    time_integrate,
    top_count,
)

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/fia.yaml").read_text())["settings"]
# A short schedule and four placeholders keep each saliency pass to a couple of UNet calls.
QUICK = {"inference_steps": 4, "saliency_steps": 2}


def quick_tasks(n_places: int = 4) -> dict:
    tasks = copy.deepcopy(SETTINGS["tasks"])
    for spec in tasks.values():
        spec["placeholders"] = spec["placeholders"][:n_places]
    return tasks


def fia(**overrides) -> FIA:
    return FIA(**(SETTINGS | QUICK | {"tasks": quick_tasks()} | overrides))


def no_base_images(*_args, **_kwargs):
    raise AssertionError("FIA never asks for base-model images")


def request(engine, targets, seed: int = 0, task=TASK) -> EraseRequest:
    retain = tuple(c for c in task.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, seed, task, engine, no_base_images)


def weight_names(engine, layer: str = "ffn2") -> list[str]:
    return [f"unet.{n}.weight" for n in FIA.layers(engine.pipe.unet, layer)]


def eq8(masks: list[dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    """Eq. 8 written out: prune connections selected by some but fewer than ⌈αC⌉ concepts."""
    tau = math.ceil(round(alpha * len(masks), 6))
    return {
        name: (s > 0) & (s < tau) if tau > 1 else s > 0
        for name in masks[0]
        for s in [sum(m[name].int() for m in masks)]
    }


# ---- what changes ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["code", "paper"])
def test_only_ffn2_weights_change_exactly_on_the_fused_mask(variant: str) -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    method = fia(variant=variant, r2=0.05)
    targets = TASK.concepts[:3]
    req = request(engine, targets)

    # the fused mask rebuilt here from each concept's own Q (Eqs. 2-6) with Eq. 8 spelt out
    spec = method.task_prompts(TASK.name)
    layers = FIA.layers(engine.pipe.unet)
    per_concept = []
    for concept in targets:
        concept_prompts, base_prompts = method.prompts(engine, spec, concept)
        sums = method.collect(engine, concept_prompts, squares=False, seed=1244)
        base_sums = method.collect(engine, sorted(base_prompts), squares=True, seed=1244)
        r1, r2 = method.rates(spec, concept)
        per_concept.append(method.concept_masks(sums, base_sums, layers, r1, r2))
    expected = eq8(per_concept, spec.alpha)

    info = method.erase(req)
    delta, non_finite = artifacts.extract(engine.pipe, base)
    assert not non_finite
    assert delta.changed == sorted(weight_names(engine))  # every FFN2 weight, no bias, nothing else
    assert set(delta.tensors) == {artifacts.ZERO + n for n in delta.changed}  # zeroing only
    for name, prune in expected.items():
        full = f"unet.{name}.weight"
        assert prune.any()
        assert torch.equal(delta.tensors[artifacts.ZERO + full], prune & (base[full] != 0))

    pruned = sum(int(p.sum()) for p in expected.values())
    ffn2 = sum(base[n].numel() for n in weight_names(engine))
    unet = sum(t.numel() for n, t in base.items() if n.startswith("unet."))
    assert info["fusion"] == "eq8" and info["agnostic_threshold"] == 2 and info["rule"] is None
    assert info["pruned_connections"] == pruned == sum(delta.changed_counts(base).values())
    assert info["layer"] == "ffn2" and info["layer_weights"] == ffn2 == 28672
    assert info["sparsity_layer"] == pytest.approx(pruned / ffn2)
    assert info["sparsity_unet"] == pytest.approx(pruned / unet)
    assert info["agnostic_kept"] > 0  # three overlapping selections leave shared connections
    assert info["selected_any"] == pruned + info["agnostic_kept"]


@pytest.mark.parametrize("layer", [name for name in LAYERS if name != "ffn2"])
def test_the_layer_switch_masks_that_linear_of_every_block_and_nothing_else(layer: str) -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    info = fia(layer=layer, r2=0.05).erase(request(engine, TASK.concepts[:3]))
    delta, _ = artifacts.extract(engine.pipe, base)
    names = weight_names(engine, layer)
    assert len(names) == 4 and all(LAYERS[layer] in n for n in names)
    assert delta.changed == sorted(names)
    assert set(delta.tensors) == {artifacts.ZERO + n for n in delta.changed}  # zeroing only
    assert info["layer"] == layer and info["layers"] == 4
    assert info["layer_weights"] == sum(base[n].numel() for n in names)
    assert info["pruned_connections"] == sum(delta.changed_counts(base).values()) > 0


def test_the_random_control_prunes_as_many_connections_per_layer_elsewhere() -> None:
    engine = tiny_engine()
    targets = TASK.concepts[:3]
    saliency, _ = fia(r2=0.05).plan(request(engine, targets, seed=5))
    drawn, info = fia(r2=0.05, selection="random").plan(request(engine, targets, seed=5))
    again, _ = fia(r2=0.05, selection="random").plan(request(engine, targets, seed=5))
    other, _ = fia(r2=0.05, selection="random").plan(request(engine, targets, seed=6))
    assert info["selection"] == "random" and set(drawn) == set(saliency)
    for name, mask in saliency.items():
        assert mask.sum() > 0 and int(drawn[name].sum()) == int(mask.sum())
        assert torch.equal(drawn[name], again[name])  # the erasure seed fixes the draw
    assert any(not torch.equal(drawn[n], other[n]) for n in drawn)
    assert any(not torch.equal(drawn[n], saliency[n]) for n in drawn)
    overlap = sum(int((drawn[n] & saliency[n]).sum()) for n in drawn)
    assert info["random_overlap_with_saliency"] == overlap / info["pruned_connections"] < 0.5
    chance = sum(int(m.sum()) ** 2 / m.numel() for m in saliency.values())
    assert info["random_overlap_by_chance"] == pytest.approx(chance / info["pruned_connections"])

    base = artifacts.snapshot(engine.pipe)
    fia(r2=0.05, selection="random").erase(request(engine, targets, seed=5))
    delta, _ = artifacts.extract(engine.pipe, base)
    for name, mask in drawn.items():  # the drawn mask is what erase zeroes
        full = f"unet.{name}.weight"
        assert torch.equal(delta.tensors[artifacts.ZERO + full], mask & (base[full] != 0))


def test_an_unknown_layer_is_refused_with_the_choices() -> None:
    with pytest.raises(FiaBenchError, match=r"attn2\.to_v"):
        fia(layer="ffn3")


def test_empty_targets_change_nothing() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    assert fia().erase(request(engine, []))["pruned_connections"] == 0
    assert artifacts.extract(engine.pipe, base)[0].changed == []


# ---- fusion (Eq. 8) and the single-concept rule -----------------------------------------------
def test_agnostic_threshold_is_the_ceiling_of_alpha_c() -> None:
    assert agnostic_threshold(0.6, 1) == 1
    assert agnostic_threshold(0.6, 2) == 2
    assert agnostic_threshold(0.6, 5) == 3
    assert agnostic_threshold(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001 in floats
    assert agnostic_threshold(0.8, 10) == 8
    assert agnostic_threshold(0.2, 10) == 2


def test_fusion_prunes_between_zero_and_the_threshold() -> None:
    counts = torch.arange(6).repeat(2, 1)  # how many of C = 5 concepts selected each entry
    assert fuse(counts, 5, 0.6, "naive")[0].tolist() == [False, True, True, False, False, False]
    assert fuse(counts, 5, 1.0, "naive")[0].tolist() == [False, True, True, True, True, False]
    # ⌈0.2 · 5⌉ = 1: Eq. 8 keeps everything; naive prunes every selected entry
    assert fuse(counts, 5, 0.2, "naive")[0].tolist() == [False, *[True] * 5]
    assert not fuse(counts, 5, 0.2, "keep_all").any()
    one = torch.tensor([0, 1, 1, 0])
    assert fuse(one, 1, 0.6, "naive").tolist() == [False, True, True, False]
    assert not fuse(one, 1, 0.6, "keep_all").any()


def test_smaller_alpha_prunes_a_subset_of_larger_alpha() -> None:
    """Raising α raises ⌈αC⌉, so fewer connections count as concept-agnostic and more are pruned
    (paper Table 9: kept agnostic neurons fall from 42,562 at α = 0.2 to 127 at α = 0.8)."""
    engine = tiny_engine()
    method = fia(r2=0.1)
    selection = method.select_concepts(request(engine, TASK.concepts[:5]))
    unet = engine.pipe.unet
    results = [method.fuse_selection(selection, unet, a) for a in (0.4, 0.6, 0.8, 1.0)]
    for (small, small_info), (large, large_info) in itertools.pairwise(results):
        assert all(not (small[n] & ~large[n]).any() for n in small)
        assert small_info["pruned_connections"] <= large_info["pruned_connections"]
        assert small_info["agnostic_kept"] >= large_info["agnostic_kept"]
    assert results[0][1]["pruned_connections"] < results[-1][1]["pruned_connections"]
    for prune, info in results:
        assert info["selected_any"] == info["pruned_connections"] + info["agnostic_kept"]
        tau = info["agnostic_threshold"]
        for name, s in selection.counts.items():
            assert torch.equal(prune[name], (s > 0) & (s < tau))


def test_single_concept_prunes_its_whole_selection() -> None:
    engine = tiny_engine()
    method = fia()
    selection = method.select_concepts(request(engine, TASK.concepts[:1]))
    prune, info = method.fuse_selection(selection, engine.pipe.unet)
    assert info["agnostic_threshold"] == 1 and info["fusion"] == "naive"
    assert info["pruned_connections"] > 0 and info["agnostic_kept"] == 0
    for name, s in selection.counts.items():
        assert torch.equal(prune[name], s > 0)
    # Eq. 8 as written (the released code) prunes nothing for C = 1
    base = artifacts.snapshot(engine.pipe)
    kept = fia(degenerate_fusion="keep_all").erase(request(engine, TASK.concepts[:1]))
    assert kept["pruned_connections"] == 0 and kept["fusion"] == "eq8"
    assert artifacts.extract(engine.pipe, base)[0].changed == []
    # reports label such rows with the rule that made them (issue 17)
    assert info["rule"] == "⌈αC⌉=1: naive fusion, every selected connection pruned"
    assert kept["rule"] == "⌈αC⌉=1: Eq. 8 as released, nothing pruned"


# ---- saliency ----------------------------------------------------------------------------------
def stored_activations(engine, prompts, steps, stop_after, layer="ffn2"):
    """Input of every masked Linear at each of the first T steps, one prompt at a time:
    {layer: [T][P]} of (2·tokens, C_in) with the unconditional and conditional rows."""
    layers = FIA.layers(engine.pipe.unet, layer)
    store = {n: [[] for _ in range(stop_after)] for n in layers}
    step = {"t": -1}
    handles = [engine.pipe.unet.register_forward_pre_hook(lambda *_: step.update(t=step["t"] + 1))]
    for name, module in layers.items():
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, name=name: store[name][step["t"]].append(
                    args[0].detach().float().reshape(-1, args[0].shape[-1]).clone()
                )
            )
        )
    try:
        for p in prompts:
            step["t"] = -1
            engine.sample_latents(
                [p], [1244], steps=steps, guidance_scale=7.5, stop_after=stop_after
            )
    finally:
        for h in handles:
            h.remove()
    return store


def direct_u(x: torch.Tensor, w: torch.Tensor, variant: str) -> torch.Tensor:
    """U of one prompt from its stored activations, entry by entry as the spec writes it."""
    if variant == "code":
        x_tilde = x / x.norm(dim=1, keepdim=True)
        return w.abs() * x_tilde.norm(dim=0)[None, :]
    y = x @ w.T
    u = torch.empty_like(w)
    for i in range(w.shape[0]):
        cos = (x * y[:, i : i + 1]).sum(0) / (x.norm(dim=0) * y[:, i].norm() + 1e-8)
        u[i] = w[i].abs() * x.norm(dim=0) * cos.abs()
    return u


@pytest.mark.parametrize(
    ("variant", "rows", "layer"),
    [
        ("code", "both", "ffn2"),
        ("paper", "both", "ffn2"),
        ("paper", "cond", "ffn2"),
        ("code", "both", "attn2.to_k"),  # the input is the text states, not the image tokens
        ("paper", "both", "ffn1"),
    ],
)
def test_running_sums_equal_saliency_from_stored_activations(
    variant: str, rows: str, layer: str
) -> None:
    engine = tiny_engine()
    steps, t_steps = 4, 2
    # one prompt per pass, as the activations below are stored: CPU convolutions round
    # differently at other batch sizes, and the std's cancellation would magnify that
    method = fia(
        variant=variant,
        inference_steps=steps,
        saliency_steps=t_steps,
        batch_size=1,
        cfg_rows=rows,
        layer=layer,
    )
    concept_prompts = ["a tench in a road", "a tench near the lake", "a tench in a park"]
    base_prompts = ["a road", "a lake", "a park"]
    got = method.step_saliency(engine, concept_prompts, base_prompts, seed=1244)

    concept_x = stored_activations(engine, concept_prompts, steps, t_steps, layer)
    base_x = stored_activations(engine, base_prompts, steps, t_steps, layer)
    if rows == "cond":  # stored rows are [uncond tokens, cond tokens]: keep the second half
        for store in (concept_x, base_x):
            for per_step in store.values():
                for xs in per_step:
                    xs[:] = [x[x.shape[0] // 2 :] for x in xs]
    for name, module in FIA.layers(engine.pipe.unet, layer).items():
        w = module.weight.detach().float()
        expected = []
        for t in range(t_steps):
            u_c = torch.stack([direct_u(x, w, variant) for x in concept_x[name][t]])
            u_b = torch.stack([direct_u(x, w, variant) for x in base_x[name][t]])
            s = (u_c.mean(0) - u_b.mean(0) - u_b.std(0, unbiased=False)).clamp_min(0)
            expected.append(s)
        expected = torch.stack(expected)
        assert got[name].shape == (t_steps, *w.shape)
        assert (expected > 0).any()
        scale = expected.abs().max()
        assert torch.allclose(got[name], expected, rtol=1e-4, atol=1e-5 * scale), name


def test_time_integration_follows_eq3() -> None:
    s = torch.tensor([[[4.0, 3.0], [2.0, 0.0]], [[0.0, 1.0], [2.0, 8.0]]])  # T = 2, 2×2
    # r1 = 0.5 of 4 entries: k = 2; τ = 2nd largest; indicator strictly above τ
    freq = torch.tensor([[0.5, 0.0], [0.0, 0.5]])  # step 0: only 4 > 3; step 1: only 8 > 2
    mean = s.mean(0)
    assert torch.allclose(time_integrate(s, 0.5, False, "ceil"), 0.5 * mean + 0.5 * freq)
    assert torch.allclose(time_integrate(s, 0.5, True, "ceil"), 0.5 * mean / 4.0 + 0.5 * freq)


def test_selection_is_row_topk_and_layer_topk_and_positive() -> None:
    a = torch.tensor([[9.0, 8.0, 7.0, 0.0], [1.0, 0.5, 0.0, 0.0], [6.0, 0.0, 5.0, 4.0]])
    # r2 = 0.5: k = 2 per row of 4, Kg = 6 of 12
    both = select(a, 0.5, "both", True, "floor")
    assert both.int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]]
    row = select(a, 0.5, "row", True, "floor")
    assert row.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0]]
    layer = select(a, 0.5, "layer", True, "floor")
    assert layer.int().tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]]
    zeros = torch.zeros(2, 4)
    assert not select(zeros, 0.5, "both", True, "floor").any()
    assert select(zeros, 0.5, "both", False, "floor").sum() == 2  # ties to the lower index
    assert top_count(0.007, 128, "floor") == 1 and top_count(0.07, 100, "ceil") == 7


# ---- settings ----------------------------------------------------------------------------------
def test_per_concept_r2_override_selects_a_superset() -> None:
    method = fia(r2_overrides={"Tench": 0.05})
    spec = method.task_prompts("objects")
    assert method.rates(spec, "tench") == (0.05, 0.05)
    assert method.rates(spec, "golf ball") == (0.05, 0.03)  # the YAML's own override
    assert method.rates(spec, "church") == (0.05, 0.007)

    engine = tiny_engine()
    concept_prompts, base_prompts = method.prompts(engine, spec, "tench")
    sums = method.collect(engine, concept_prompts, squares=False, seed=1244)
    base = method.collect(engine, base_prompts, squares=True, seed=1244)
    layers = FIA.layers(engine.pipe.unet)
    small = method.concept_masks(sums, base, layers, 0.05, 0.007)
    large = method.concept_masks(sums, base, layers, 0.05, 0.05)
    assert sum(int(m.sum()) for m in large.values()) > sum(int(m.sum()) for m in small.values())
    assert all(not (small[n] & ~large[n]).any() for n in small)

    selection = method.select_concepts(request(engine, ["tench", "church"]))
    assert selection.per_concept["tench"]["r2"] == 0.05
    assert selection.per_concept["church"]["r2"] == 0.007
    assert selection.per_concept["tench"]["selected"] > selection.per_concept["church"]["selected"]


def test_prompts_come_from_the_settings() -> None:
    engine = tiny_engine()
    code = FIA(**SETTINGS)
    spec = code.task_prompts("objects")
    concept_prompts, base_prompts = code.prompts(engine, spec, "church")
    assert len(concept_prompts) == len(base_prompts) == 30
    assert concept_prompts[:2] == ["a church in a road", "a church near the tree"]
    assert base_prompts[:2] == ["a road", "a tree"]

    paper = FIA(**(SETTINGS | {"variant": "paper"}))
    chosen, chosen_base = paper.prompts(engine, spec, "church")
    assert len(chosen) == 5 and set(chosen_base) <= set(base_prompts)
    assert chosen_base == [b for b in base_prompts if b in chosen_base]  # listed order kept
    assert paper.prompts(engine, spec, "church") == (chosen, chosen_base)

    styles = code.task_prompts("styles")
    assert code.prompts(engine, styles, "van gogh")[0][0] == "a cat in the style of van gogh"
    assert code.rates(styles, "Van Gogh")[1] == 0.03 and styles.alpha == 0.8
    with pytest.raises(FiaBenchError, match="unknown FIA prompt set for task 'object'"):
        code.task_prompts("object")

    mini = code.task_prompts("objects", world="mini")  # a world's own prompt set wins
    assert code.prompts(engine, mini, "star")[0][:2] == [
        "a star in the desert",
        "a star in the ocean",
    ]
    assert code.task_prompts("objects", world="sd") == spec
    # a task file's kind picks the settings: FIA's 50-class sweep is the objects task's
    objects50 = load_task("objects50", "sd")
    assert (objects50.kind, load_task("styles", "sd").kind) == ("objects", "styles")
    assert code.task_prompts(objects50.kind, objects50.world) == spec


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(FiaBenchError, match=r"unknown FIA variant 'papr'.*did you mean 'paper'"):
        FIA(variant="papr")
    with pytest.raises(FiaBenchError, match=r"alpha=0.0.*must be in \(0, 1\]"):
        FIA(alpha=0.0)
    with pytest.raises(FiaBenchError, match="saliency_steps=60"):
        FIA(saliency_steps=60, inference_steps=50)
    bad = {"concept_templates": ["a {concept}"], "base_templates": ["a {placeholder}"]}
    with pytest.raises(FiaBenchError, match=r"tasks.objects: needs concept_templates"):
        FIA(tasks={"objects": bad | {"placeholders": ["road"]}}).task_prompts("objects")


# ---- determinism and the harness ---------------------------------------------------------------
def test_deterministic_for_a_seed() -> None:
    masks, infos = [], []
    for _ in range(2):
        prune, info = fia(noise_seed=None).plan(request(tiny_engine(), TASK.concepts[:2], seed=3))
        masks.append(prune)
        infos.append(info)
    assert infos[0] == infos[1] and infos[0]["noise_seed"] == 3
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [
            *FAST_RUN,
            "method=fia",
            "seeds=1",
            "n_concepts=[1,2]",
            "method.settings.inference_steps=4",
            "method.settings.saliency_steps=2",
            "method.settings.placeholders_per_concept=3",
            "method.settings.r2_overrides={english springer: 0.05}",
        ],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs[result.runs["method"].map(registered_name) == "fia"].set_index("n_concepts")
    assert set(runs["status"]) == {"ok"}
    for n in (1, 2):
        info = json.loads(runs.loc[n, "info"])
        assert info["concepts"] == n and info["pruned_connections"] > 0
        assert runs.loc[n, "changed_entries"] == info["pruned_connections"]
        assert runs.loc[n, "changed_tensors"] == info["layers"] == 4
        assert 0 < info["sparsity_unet"] < info["sparsity_layer"] < 1
        assert info["per_concept"]["tench"]["r2"] == 0.007
    assert json.loads(runs.loc[2, "info"])["per_concept"]["english springer"]["r2"] == 0.05
    assert {"fia", "none"} == set(result.records["method"].map(registered_name))
