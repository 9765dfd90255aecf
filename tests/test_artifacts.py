"""Erasure deltas: exact round trips, compact masks, and only the edited tensors recorded."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import tiny_pipe

from fia_bench import artifacts


def test_extract_apply_restore_round_trip(tmp_path: Path) -> None:
    pipe = tiny_pipe()
    base = artifacts.snapshot(pipe)
    ff = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2]
    to_k = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    with torch.no_grad():
        ff.weight[:, :5] = 0  # a pure zeroing edit -> stored as a mask
        to_k.weight.mul_(1.5)  # a general edit -> stored as the new tensor
    edited = {k: v.clone() for k, v in artifacts.named_tensors(pipe).items()}
    delta, non_finite = artifacts.extract(pipe, base)

    assert non_finite == []
    ff_name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight"
    k_name = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert delta.changed == sorted([ff_name, k_name])
    assert delta.tensors[artifacts.ZERO + ff_name].dtype == torch.bool
    assert artifacts.REPLACE + k_name in delta.tensors
    counts = delta.changed_counts(base)
    assert counts[ff_name] == int((base[ff_name][:, :5] != 0).sum())
    assert counts[k_name] == int((base[k_name] != 0).sum())

    artifacts.restore(pipe, base, delta.changed)
    assert all(torch.equal(t, base[n]) for n, t in artifacts.named_tensors(pipe).items())

    delta.save(tmp_path / "d.safetensors", {"method": "test"})
    loaded = artifacts.Delta.load(tmp_path / "d.safetensors")
    assert loaded.digest() == delta.digest()
    artifacts.apply(pipe, loaded)
    assert all(torch.equal(t, edited[n]) for n, t in artifacts.named_tensors(pipe).items())


def test_non_finite_weights_are_reported() -> None:
    pipe = tiny_pipe()
    base = artifacts.snapshot(pipe)
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    _, non_finite = artifacts.extract(pipe, base)
    assert non_finite == ["unet.conv_in.weight"]


def test_empty_delta_digest_is_shared() -> None:
    assert artifacts.Delta().digest() == artifacts.Delta().digest()
