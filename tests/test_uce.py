"""UCE: each solved matrix satisfies its normal equations; only attn2 K/V change; retained
concepts' key/value outputs barely move while the erased concept's move toward the guide."""

from __future__ import annotations

import pytest
from tiny import tiny_engine

from fia_bench import artifacts
from fia_bench.api import EraseRequest
from fia_bench.errors import FiaBenchError
from fia_bench.tasks import load_task
from methods.uce import UCE, normal_equations

TASK = load_task("objects", "tiny")


def request(engine, targets, retain) -> EraseRequest:
    return EraseRequest(tuple(targets), tuple(retain), 0, TASK, engine)


@pytest.mark.parametrize("variant", ["paper", "lasttoken"])
def test_solution_satisfies_normal_equations_and_touches_only_kv(variant: str) -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    method = UCE(variant=variant)
    targets, retain = TASK.split(2)
    c_erase, c_guide = method.pairs(engine, targets)
    c_keep, n_texts = method.preserve_rows(engine, retain)
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
    method = UCE(variant="lasttoken", guide="")
    targets, retain = TASK.split(1)
    c_erase, c_guide = method.pairs(engine, targets)
    c_keep, _ = method.preserve_rows(engine, retain)
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
