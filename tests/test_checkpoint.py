"""method=checkpoint loads an erased model made elsewhere into the base pipeline: each input kind
sets exactly the edited weights and nothing else, and bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_engine, tiny_pipe

from fia_bench import artifacts
from fia_bench.api import EraseRequest
from fia_bench.errors import FiaBenchError
from fia_bench.tasks import load_task
from methods.checkpoint import Checkpoint, file_sha256

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
KEY = f"{MODULE}.weight"


def erase(path: Path, **settings) -> tuple[dict, dict, dict]:
    """(info, base weights, weights after loading) on a fresh tiny pipeline."""
    pipe = tiny_pipe()
    base = artifacts.snapshot(pipe)
    request = EraseRequest(("circle",), (), 0, load_task("objects", "tiny"), tiny_engine(pipe))
    info = Checkpoint(path=str(path), **settings).erase(request)
    return info, base, artifacts.snapshot(pipe)


def edited_weight() -> torch.Tensor:
    weight = tiny_pipe().unet.state_dict()[KEY]
    return weight + torch.arange(weight.numel(), dtype=weight.dtype).reshape(weight.shape) / 100


def changed(base: dict, after: dict) -> list[str]:
    return [name for name in base if not torch.equal(base[name], after[name])]


def write_pipeline(tmp_path: Path) -> Path:
    pipe = tiny_pipe()
    with torch.no_grad():
        pipe.unet.state_dict()[KEY].copy_(edited_weight())
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def write_unet_safetensors(tmp_path: Path) -> Path:
    state = {k: v.contiguous() for k, v in tiny_pipe().unet.state_dict().items()}
    save_file(state | {KEY: edited_weight()}, tmp_path / "unet.safetensors")
    return tmp_path / "unet.safetensors"


def write_state_dict(tmp_path: Path) -> Path:
    torch.save({KEY: edited_weight()}, tmp_path / "esd.pt")  # ESD-x saves only what it trained
    return tmp_path / "esd.pt"


@pytest.mark.parametrize("write", [write_pipeline, write_unet_safetensors, write_state_dict])
def test_each_kind_sets_exactly_the_edited_weight(write, tmp_path: Path) -> None:
    path = write(tmp_path)
    info, base, after = erase(path)
    assert changed(base, after) == [f"unet.{KEY}"]
    assert torch.equal(after[f"unet.{KEY}"], edited_weight())
    files = sorted(path.glob("*/*.safetensors")) if path.is_dir() else [path]
    assert info["sha256"] == file_sha256(files, path) and len(info["sha256"]) == 64


def test_a_lora_is_merged_as_scale_times_up_at_down(tmp_path: Path) -> None:
    weight = tiny_pipe().unet.state_dict()[KEY]
    down = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0))
    up = torch.randn(weight.shape[0], 2, generator=torch.Generator().manual_seed(1))
    (tmp_path / "lora").mkdir()
    save_file(
        {f"unet.{MODULE}.lora_A.weight": down, f"unet.{MODULE}.lora_B.weight": up},
        tmp_path / "lora" / "pytorch_lora_weights.safetensors",
    )
    info, base, after = erase(tmp_path / "lora", lora_scale=0.5)
    assert info["kind"] == "lora"
    assert changed(base, after) == [f"unet.{KEY}"]
    torch.testing.assert_close(after[f"unet.{KEY}"], weight + 0.5 * up @ down)


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FiaBenchError, match="no such file or folder"):
        Checkpoint(path=str(tmp_path / "missing.pt"))
    with pytest.raises(FiaBenchError, match=r"needs method\.settings\.path"):
        Checkpoint()
    torch.save({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "ldm.pt")
    with pytest.raises(FiaBenchError, match="1 key\\(s\\) match no unet weight") as err:
        erase(tmp_path / "ldm.pt")
    assert "\n" not in str(err.value)
    torch.save({"state_dict": {KEY: edited_weight()}, "step": object()}, tmp_path / "pickled.pt")
    with pytest.raises(FiaBenchError, match="weights_only=True\\) refuses it") as err:
        erase(tmp_path / "pickled.pt")
    assert "\n" not in str(err.value)
    torch.save({KEY: torch.zeros(3)}, tmp_path / "shape.pt")
    with pytest.raises(FiaBenchError, match="has shape \\(3,\\)"):
        erase(tmp_path / "shape.pt")


def test_a_file_replaced_in_place_is_a_new_edit(tmp_path: Path) -> None:
    path = write_state_dict(tmp_path)
    before = Checkpoint.input_fingerprint({"path": str(path)})
    torch.save({KEY: edited_weight() * 2}, path)
    after = Checkpoint.input_fingerprint({"path": str(path)})
    assert before["sha256"] != after["sha256"] == file_sha256([path], path)
