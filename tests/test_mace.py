"""MACE: only attn2.to_k / attn2.to_v change; the refinement and the fusion solve their normal
equations; one LoRA fused alone at λ = 0 is that LoRA exactly; the token pairing follows the
shared prefix and suffix; training shrinks the concept's attention; and a harness run."""

from __future__ import annotations

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
from fia_bench.unet_edit import concept_token_mask
from methods.mace import MACE, matching_positions, ridge_fit

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/mace.yaml").read_text())["settings"]


def mace(**overrides) -> MACE:
    settings = SETTINGS | {"train_steps": 3, "images_per_concept": 2} | overrides
    settings["templates"] = {k: v[:4] for k, v in SETTINGS["templates"].items()}
    return MACE(**settings)


def base_images(engine):
    def make(prompts, seeds, negative_prompts=None):
        return engine.generate(prompts, seeds)

    return make


def request(engine, targets, seed: int = 0) -> EraseRequest:
    retain = tuple(c for c in TASK.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, seed, TASK, engine, base_images(engine))


def projections(engine) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in engine.pipe.unet.named_modules()
        if n.endswith(("attn2.to_k", "attn2.to_v"))
    }


def test_matching_positions_pair_the_shared_prefix_suffix_and_padding() -> None:
    # [bos, a, photo, of, X, eos] vs [bos, a, photo, of, Y, Z, eos]: X and Y Z differ
    old, new = matching_positions([0, 1, 2, 3, 9, 5], [0, 1, 2, 3, 7, 8, 5])
    assert old[:5] == [0, 1, 2, 3, 5] and new[:5] == [0, 1, 2, 3, 6]
    assert len(old) == len(new) and old[-1] == 75 and new[-1] == 76
    assert all(b - a == 1 for a, b in zip(old[4:], new[4:], strict=True))  # EOS/padding aligned


def test_ridge_fit_solves_its_normal_equations() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(5, 4, generator=g, dtype=torch.float64)
    c1, v1 = torch.randn(7, 4, generator=g).double(), torch.randn(7, 5, generator=g).double()
    c2, v2 = torch.randn(3, 4, generator=g).double(), torch.randn(3, 5, generator=g).double()
    w = ridge_fit(anchor, 0.5, [(c1, v1, 1.0), (c2, v2, 0.3)])
    gradient = 0.5 * (w - anchor) + (w @ c1.T - v1.T) @ c1 + 0.3 * (w @ c2.T - v2.T) @ c2
    assert gradient.abs().max() < 1e-10
    with pytest.raises(FiaBenchError, match=r"singular; raise method\.settings\.lamb"):
        ridge_fit(anchor, 0.0, [(torch.zeros(3, 4, dtype=torch.float64), v2, 1.0)])


def test_refinement_solves_its_equations_and_touches_only_the_projections() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    method = mace(train_lora=False, preserve_retain=True, preserve_scale=0.5)
    targets = TASK.concepts[:2]
    info = method.erase(request(engine, targets))
    delta, non_finite = artifacts.extract(engine.pipe, base)
    assert not non_finite
    assert delta.changed == sorted(f"unet.{n}.weight" for n in projections(engine))
    assert info["edited_matrices"] == 8 and info["mapping"] == {
        c: TASK.superclasses[c] for c in targets
    }

    # the stationarity of λ‖W − W0‖² + Σ‖W c − W0 g‖² + s_p Σ‖W k − W0 k‖², rows rebuilt here
    rows = [
        method.cfr_rows(
            engine, method.augment("object", c), method.augment("object", TASK.superclasses[c])
        )
        for c in targets
    ]
    c, g = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    keep = method.all_rows(
        engine, [p for r in TASK.concepts[2:] for p in method.augment("object", r)]
    )
    assert info["cfr_rows"] == c.shape[0] and info["preserve_rows"] == keep.shape[0]
    for name, m in projections(engine).items():
        w0, w = base[f"unet.{name}.weight"].double(), m.weight.detach().double()
        gradient = (
            100.0 * (w - w0) + (w @ c.T - w0 @ g.T) @ c + 0.5 * (w @ keep.T - w0 @ keep.T) @ keep
        )
        scale = 100.0 + torch.linalg.norm(c.T @ c, 2) + 0.5 * torch.linalg.norm(keep.T @ keep, 2)
        assert gradient.abs().max() < 1e-6 * scale * w.abs().max()  # float32 weights


def test_fusion_solves_its_equations_and_one_lora_alone_without_anchor_is_that_lora() -> None:
    engine = tiny_engine()
    layers = projections(engine)
    w_cfr = {n: m.weight.detach().double().clone() for n, m in layers.items()}
    g = torch.Generator().manual_seed(1)
    deltas = {
        c: {n: torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in w_cfr.items()}
        for c in ("a", "b")
    }
    rows = {c: torch.randn(40, 32, generator=g, dtype=torch.float64) for c in ("a", "b")}
    keep = torch.randn(10, 32, generator=g, dtype=torch.float64)
    # λ = 0, one LoRA, full-rank rows: the fit is exact, W = W_cfr + ΔW
    mace(lamb=0.0).fuse(layers, w_cfr, {"a": deltas["a"]}, {"a": rows["a"]}, None)
    for name, m in layers.items():
        expected = (w_cfr[name] + deltas["a"][name]).float()
        torch.testing.assert_close(m.weight.detach(), expected, rtol=1e-5, atol=1e-5)
    # two LoRAs, an anchor and preserved rows: the stationarity of the fusion's objective
    for name, m in layers.items():
        m.weight.data.copy_(w_cfr[name])
    w0 = {n: torch.zeros_like(w) for n, w in w_cfr.items()}
    mace(lamb=2.0, preserve_scale=0.5).fuse(layers, w0, deltas, rows, keep)
    for name, m in layers.items():
        w = m.weight.detach().double()
        gradient = 2.0 * (w - w_cfr[name]) + 0.5 * (w @ keep.T) @ keep
        for c in ("a", "b"):
            gradient += (w - w_cfr[name] - deltas[c][name]) @ rows[c].T @ rows[c]
        assert gradient.abs().max() < 1e-3


def test_lora_training_shrinks_the_concepts_attention_and_leaves_the_unet_as_it_was() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    processors = {n: type(p) for n, p in engine.pipe.unet.attn_processors.items()}
    grads = [p.requires_grad for p in engine.pipe.unet.parameters()]
    method = mace(train_steps=30, lr=3e-2, images_per_concept=1, importance_sampling=False)
    req = request(engine, ["tench"])
    latents = method.training_latents(req, "object")["tench"]
    prompts = method.augment("object", "tench")[:1]
    deltas, losses = method.train_lora_deltas(req, projections(engine), "tench", prompts, latents)
    assert losses[-1] < 0.9 * losses[0]
    assert set(deltas) == set(projections(engine))
    assert all(
        torch.linalg.matrix_rank(d, rtol=1e-5) <= 1 for d in deltas.values()
    )  # rank-1 updates
    assert all(d.abs().max() > 0 for n, d in deltas.items() if n.endswith("to_k"))
    assert artifacts.extract(engine.pipe, base)[0].changed == []  # training edits only the LoRA
    assert {n: type(p) for n, p in engine.pipe.unet.attn_processors.items()} == processors
    assert [p.requires_grad for p in engine.pipe.unet.parameters()] == grads


def test_concept_positions_are_the_word_and_the_pooler_tokens() -> None:
    tokenizer = tiny_engine().pipe.tokenizer
    prompt = "a photo of english springer"
    positions = concept_token_mask(tokenizer, prompt, "english springer", pooler=True)
    word = len(tokenizer("english springer", add_special_tokens=False).input_ids)
    n_prompt = len(tokenizer(prompt).input_ids)
    assert int(positions.sum()) == word + (77 - n_prompt + 1)  # word pieces + EOS and padding
    alone = concept_token_mask(tokenizer, prompt, "english springer", pooler=False)
    assert int(alone.sum()) == word and alone[4 : 4 + word].all()  # after bos, a, photo, of


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(FiaBenchError, match="unknown MACE concept_type 'objet'"):
        mace(concept_type="objet")
    with pytest.raises(FiaBenchError, match=r"templates.object: needs a non-empty list"):
        MACE(**(SETTINGS | {"templates": {"object": ["a photo"], "style": ["{}"]}}))


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [
            *FAST_RUN,
            "method=mace",
            "seeds=1",
            "n_concepts=[2]",
            "method.settings.train_steps=2",
            "method.settings.images_per_concept=1",
        ],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs[result.runs["method"].map(registered_name) == "mace"].set_index("n_concepts")
    assert set(runs["status"]) == {"ok"}
    info = json.loads(runs.loc[2, "info"])
    assert info["edited_matrices"] == runs.loc[2, "changed_tensors"] == 8
    assert set(info["lora_loss"]) == set(TASK.concepts[:2])
