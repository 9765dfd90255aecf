"""SAFREE: the projection removes the toxic subspace's component and leaves states already in the
prompt's span and orthogonal to the subspace as they are; triggers are the tokens whose removal
moves the prompt away from the subspace; with nothing to project and no negative prompt the
images are the unedited model's; the weights are untouched."""

from __future__ import annotations

import math

import numpy as np
import torch
import yaml
from conftest import REPO
from tiny import tiny_engine

from fia_bench.tasks import load_task
from methods.safree import (
    SAFREE,
    filter_steps,
    projected_states,
    span_projector,
    trigger_tokens,
)

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/safree.yaml").read_text())["settings"]
PROMPTS = ["a photo of a tench", "a photo of a church"]
SEEDS = [4, 8]


def test_span_projector_is_the_orthogonal_projector_on_the_rows() -> None:
    rows = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = span_projector(rows)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)
    torch.testing.assert_close(rows @ p, rows)
    assert round(float(torch.trace(p))) == 3


def test_projection_removes_the_toxic_component_and_keeps_orthogonal_states() -> None:
    g = torch.Generator().manual_seed(1)
    toxic = span_projector(torch.randn(2, 16, dtype=torch.float64, generator=g))
    masked = torch.randn(5, 16, dtype=torch.float64, generator=g)
    states = torch.randn(7, 16, dtype=torch.float64, generator=g)
    projected = projected_states(states, masked, toxic)
    assert (projected @ toxic).abs().max() < 1e-10
    # a prompt whose span is orthogonal to the toxic subspace keeps its states
    keep = torch.eye(16, dtype=torch.float64)[:4]
    away = span_projector(torch.eye(16, dtype=torch.float64)[10:12])
    inside = torch.randn(6, 4, dtype=torch.float64, generator=g) @ keep
    torch.testing.assert_close(projected_states(inside, keep, away), inside)


def test_triggers_are_the_tokens_whose_removal_leaves_the_subspace() -> None:
    toxic = span_projector(torch.eye(4, dtype=torch.float64)[:1])  # the first axis
    # three masked prompts: masking token 1 removes the toxic direction (distance 2, the
    # others' mean 1), masking the others keeps it (distance 1)
    masked = torch.tensor(
        [[5.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [5.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    assert trigger_tokens(masked, toxic, alpha=0.01).tolist() == [False, True, False]
    assert trigger_tokens(masked, toxic, alpha=1.5).tolist() == [False, False, False]
    # equal distances: no trigger; one token: a trigger (the code's empty mean is nan)
    orthogonal = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    assert trigger_tokens(orthogonal, toxic, alpha=0.01).tolist() == [False, False]
    assert trigger_tokens(masked[:1], toxic, alpha=0.01).tolist() == [True]


def test_self_validating_filter_steps() -> None:
    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    for beta in (0.0, 0.4, 0.5333, 0.6, 1.0):
        expected = round(10 * sigmoid(2 * 2.5 * (10 * beta - 5.333)))
        assert filter_steps(beta, 10, 5.333, 2.5) == expected
    assert filter_steps(0.0, 10, 5.333, 2.5) == 0 and filter_steps(1.0, 10, 5.333, 2.5) == 10


def test_projected_prompt_rows_are_kept_or_leave_the_toxic_subspace() -> None:
    engine = tiny_engine(steps=4)
    guidance = SAFREE(**SETTINGS | {"self_validation": False}).sampling_guidance(("tench",), TASK)
    cond = engine.encode(PROMPTS)
    batch = guidance.start(engine, PROMPTS, engine.encode(["", ""]), cond, steps=4)
    toxic = span_projector(guidance.pooled(engine, engine.tokenize(["tench"]).input_ids))
    changed = (batch.safe != batch.cond).any(dim=-1)
    assert changed.any()
    residual = batch.safe.double()[changed] @ toxic
    assert residual.abs().max() < 1e-4 * batch.safe.abs().max()
    # the negative prompt is the keywords; every step uses the projected prompt
    torch.testing.assert_close(batch.uncond, engine.encode(["tench", "tench"]))
    torch.testing.assert_close(batch.context(3)[2:], batch.safe)


def test_nothing_to_project_gives_the_unedited_models_images_and_keeps_weights() -> None:
    engine = tiny_engine(steps=4)
    before = {k: v.clone() for k, v in engine.pipe.unet.state_dict().items()}
    off = SAFREE(**SETTINGS | {"alpha": 1e9, "negative_prompt": False}).sampling_guidance(
        ("tench",), TASK
    )
    base = engine.generate(PROMPTS, SEEDS)
    same = engine.generate(PROMPTS, SEEDS, guidance=off)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, same, strict=True)
    )
    on = SAFREE(**SETTINGS).sampling_guidance(("tench",), TASK)
    changed = engine.generate(PROMPTS, SEEDS, guidance=on)
    assert not np.array_equal(np.asarray(changed[0]), np.asarray(base[0]))
    after = engine.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
