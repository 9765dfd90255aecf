"""Builders shared by tests that work in-process on the tiny random world, and the mini world's
training recipe cut to toy size."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from fia_bench.engine import Engine, Sampler
from fia_bench.miniworld.build_files import recipe
from fia_bench.models import random_pipeline
from fia_bench.tasks import world_vocabulary


def tiny_pipe():
    return random_pipeline("tiny", world_vocabulary("tiny"), resolution=16, seed=0)


def tiny_engine(pipe=None, steps: int = 2, batch_size: int = 4) -> Engine:
    return Engine(
        pipe or tiny_pipe(), Sampler("ddim", steps, 7.5, 0.0, batch_size), 16, "cpu", torch.float32
    )


def toy_recipe(tmp_path: Path) -> Path:
    r = recipe()
    r["data"]["train_images"] = 48
    r["vae"].update(block_out_channels=[32, 32], steps=2, batch_size=4)
    r["unet"].update(block_out_channels=[32, 32, 32], attention_head_dim=[1, 1, 1])
    r["text_encoder"].update(hidden_size=32, intermediate_size=32, num_attention_heads=1)
    r["classifier"].update(width=8, steps=2, batch_size=4)
    r["clip"].update(embed_dim=16, steps=2, batch_size=4)
    r["clip"]["vision"].update(layers=1, width=32)
    r["clip"]["text"].update(layers=1, width=32, heads=1)
    r["generator"].update(steps=3, batch_size=4, warmup_steps=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r), encoding="utf-8")
    return path
