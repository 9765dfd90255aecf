"""Builders shared by tests that work in-process on the tiny random world."""

from __future__ import annotations

import torch

from fia_bench.engine import Engine, Sampler
from fia_bench.models import random_pipeline
from fia_bench.tasks import world_vocabulary


def tiny_pipe():
    return random_pipeline("tiny", world_vocabulary("tiny"), resolution=16, seed=0)


def tiny_engine(pipe=None, steps: int = 2, batch_size: int = 4) -> Engine:
    return Engine(
        pipe or tiny_pipe(), Sampler("ddim", steps, 7.5, 0.0, batch_size), 16, "cpu", torch.float32
    )
