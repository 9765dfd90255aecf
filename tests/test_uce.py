"""UCE: each solved matrix satisfies its normal equations; only attn2 K/V change; retained
concepts' key/value outputs barely move while the erased concept's move toward the guide."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_engine

from fia_bench import artifacts
from fia_bench.api import EraseRequest
from fia_bench.errors import FiaBenchError
from fia_bench.tasks import load_task
from methods.uce import UCE, normal_equations

TASK = load_task("objects", "tiny")
STYLES = load_task("styles", "tiny")
KV = ("attn2.to_k.weight", "attn2.to_v.weight")


def request(engine, targets, retain, task=TASK) -> EraseRequest:
    return EraseRequest(tuple(targets), tuple(retain), 0, task, engine)


def last_token_rows(engine, prompts: list[str]) -> torch.Tensor:
    """Each prompt's last word-piece state, read straight from the text encoder."""
    hidden = engine.encode(prompts).double().cpu()
    last = engine.tokenize(prompts).attention_mask.sum(1) - 2
    return torch.stack([hidden[i, int(f)] for i, f in enumerate(last)])


def assert_normal_equations(engine, base, c_erase, c_guide, c_keep, s_p: float) -> None:
    """Every edited K/V weight solves ``W B = A`` built from these rows (λ 0.5, s_e 1)."""
    for name, w in artifacts.named_tensors(engine.pipe).items():
        if not name.endswith(KV):
            continue
        a, b = normal_equations(base[name], c_erase, c_guide, c_keep, 0.5, 1.0, s_p)
        residual = (w.double() @ b - a).abs().max() / a.abs().max()
        assert residual < 1e-5, (name, float(residual))


@pytest.mark.parametrize("variant", ["paper", "lasttoken"])
def test_solution_satisfies_normal_equations_and_touches_only_kv(variant: str) -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    method = UCE(variant=variant)
    targets, retain = TASK.split(2)
    c_erase, c_guide = method.pairs(engine, targets, "object")
    c_keep, n_texts = method.preserve_rows(engine, retain, "object")
    info = method.erase(request(engine, targets, retain))

    delta, _ = artifacts.extract(engine.pipe, base)
    assert delta.changed and all(
        n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in delta.changed
    )
    kv = [
        n for n, _ in engine.pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))
    ]
    assert info["edited_matrices"] == len(delta.changed) == len(kv)
    s_p = info["preserve_scale"]
    assert s_p == (max(0.1, 1 / n_texts) if variant == "paper" else 1.0)
    for name in delta.changed:
        w0 = base[name]
        w = artifacts.named_tensors(engine.pipe)[name].double()
        a, b = normal_equations(w0, c_erase, c_guide, c_keep, 0.5, 1.0, s_p)
        residual = (w @ b - a).abs().max() / a.abs().max()
        assert residual < 1e-5, (name, float(residual))


def test_empty_targets_leave_weights_unchanged() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    UCE().erase(request(engine, [], TASK.concepts))
    delta, _ = artifacts.extract(engine.pipe, base)
    assert delta.changed == []


def test_retained_outputs_barely_move_and_erased_moves_to_guide() -> None:
    engine = tiny_engine()
    method = UCE(variant="lasttoken", guide="", preserve_retain=True)
    targets, retain = TASK.split(1)
    c_erase, c_guide = method.pairs(engine, targets, "object")
    c_keep, _ = method.preserve_rows(engine, retain, "object")
    to_k = engine.pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    w0 = to_k.weight.detach().double().clone()
    method.erase(request(engine, targets, retain))
    w = to_k.weight.detach().double()

    keep_shift = ((c_keep @ w.T) - (c_keep @ w0.T)).norm(dim=1) / (c_keep @ w0.T).norm(dim=1)
    erase_gap_before = ((c_erase @ w0.T) - (c_guide @ w0.T)).norm()
    erase_gap_after = ((c_erase @ w.T) - (c_guide @ w0.T)).norm()
    assert keep_shift.max() < 0.1
    assert erase_gap_after < 0.5 * erase_gap_before


def test_bad_variant_is_a_clear_error() -> None:
    with pytest.raises(FiaBenchError, match=r"unknown UCE variant 'papr'.*did you mean 'paper'"):
        UCE(variant="papr")


@pytest.mark.parametrize("variant", ["paper", "lasttoken"])
def test_objects_default_preserves_only_what_the_official_object_runs_do(variant: str) -> None:
    """Official object / nudity runs preserve "" (paper era, scale 1) or nothing (2025 code),
    never the task's other concepts."""
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    targets, retain = TASK.split(1)
    info = UCE(variant=variant).erase(request(engine, targets, retain))
    assert info["preserve_retain"] is False
    assert info["preserve_scale"] == 1.0
    assert info["preserve_rows"] == (engine.encode([""]).shape[1] if variant == "paper" else 0)
    c_erase, c_guide = UCE(variant=variant).pairs(engine, targets, "object")
    keep = engine.encode([""]).double().cpu()[0] if variant == "paper" else c_erase[:0]
    assert_normal_equations(engine, base, c_erase, c_guide, keep, 1.0)


def test_styles_default_preserves_the_other_artists_towards_art() -> None:
    """Official art runs guide to "art" and preserve every other artist (paper era: all 77 rows
    of each, plus "", at max(0.1, 1/#texts))."""
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    targets, retain = STYLES.split(1)
    info = UCE().erase(request(engine, targets, retain, STYLES))
    assert (info["concept_type"], info["guide"], info["preserve_retain"]) == ("art", "art", True)
    hidden = engine.encode(["", *retain]).double().cpu()
    s_p = max(0.1, 1 / (1 + len(retain)))
    assert info["preserve_scale"] == s_p
    c_erase, c_guide = UCE(guide="art").pairs(engine, targets, "art")
    c_keep = hidden.reshape(-1, hidden.shape[-1])
    assert_normal_equations(engine, base, c_erase, c_guide, c_keep, s_p)


def test_preserve_retain_option_still_keeps_the_retained_concepts() -> None:
    engine = tiny_engine()
    targets, retain = TASK.split(1)
    info = UCE(preserve_retain=True).erase(request(engine, targets, retain))
    assert info["preserve_retain"] is True
    assert info["preserve_rows"] == engine.encode([""]).shape[1] * (1 + len(retain))


def test_lasttoken_art_guide_is_art_and_expansion_keeps_bare_concepts_and_templates_guide() -> None:
    """2025 code: guide "art" for art; ``expand_prompts`` erases the bare concept and its five
    templates, each paired with the guide put into the same template; preserves stay bare."""
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    targets, retain = STYLES.split(2)
    method = UCE(variant="lasttoken", expand_prompts=True, preserve_retain=True)
    info = method.erase(request(engine, targets, retain, STYLES))
    templates = ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"]
    erase = [p for c in targets for p in [c, *(t.format(c) for t in templates)]]
    guides = [p for _ in targets for p in ["art", *(t.format("art") for t in templates)]]
    assert info["erase_rows"] == 6 * len(targets) and info["preserve_rows"] == len(retain)
    c_erase, c_guide = last_token_rows(engine, erase), last_token_rows(engine, guides)
    c_keep = last_token_rows(engine, list(retain))
    assert_normal_equations(engine, base, c_erase, c_guide, c_keep, 1.0)


def test_paper_expansion_keeps_bare_concepts_and_pairs_them_with_the_bare_guide() -> None:
    engine = tiny_engine()
    targets, retain = TASK.split(2)
    method = UCE(expand_prompts=True, preserve_retain=True)
    erase, guides = method.texts(targets, "object")
    assert erase[0] == targets[0] and erase[1] == f"image of {targets[0]}" and len(erase) == 12
    assert guides == [" "] * 12
    assert method.preserve_texts(retain, "object") == ["", *retain]
    info = method.erase(request(engine, targets, retain))
    assert info["preserve_rows"] == engine.encode([""]).shape[1] * (1 + len(retain))
