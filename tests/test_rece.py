"""RECE: the adversarial rows solve their regularised least squares; every re-erasure solves UCE's
normal equations on them; only attn2.to_k / attn2.to_v change; with no epochs RECE is its UCE
stage; and a harness run."""

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
from fia_bench.tasks import load_task
from methods.rece import RECE, adversarial_rows
from methods.uce import UCE, normal_equations

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/rece.yaml").read_text())["settings"]


def rece(**overrides) -> RECE:
    return RECE(**(SETTINGS | overrides))


def request(engine, targets) -> EraseRequest:
    retain = tuple(c for c in TASK.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, 0, TASK, engine)


def projections(engine) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in engine.pipe.unet.named_modules()
        if n.endswith(("attn2.to_k", "attn2.to_v"))
    }


def test_adversarial_rows_solve_their_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    edited = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    original = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    rows = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = adversarial_rows(edited, original, rows, 0.1)
    # gradient of Σ‖W x − W0 e‖² + γ‖x‖² in x, for every row
    pairs = zip(edited, original, strict=True)
    gradient = 0.1 * x + sum((x @ w.T - rows @ w0.T) @ w for w, w0 in pairs)
    assert gradient.abs().max() < 1e-10
    # an unedited model's adversarial row is the concept's own (γ = 0)
    torch.testing.assert_close(adversarial_rows(original, original, rows, 0.0), rows)


def test_without_epochs_rece_is_its_uce_stage() -> None:
    engine = tiny_engine()
    rece(epochs=0).erase(request(engine, TASK.concepts[:2]))
    after_rece = {n: m.weight.detach().clone() for n, m in projections(engine).items()}
    fresh = tiny_engine()  # the same seeded weights
    UCE(**SETTINGS["uce"]).erase(request(fresh, TASK.concepts[:2]))
    for name, m in projections(fresh).items():
        torch.testing.assert_close(after_rece[name], m.weight.detach())


def test_each_epoch_solves_uce_normal_equations_on_the_adversarial_rows() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    targets = TASK.concepts[:2]
    method = rece(epochs=1, lamb=0.1)
    # the state before the epoch: UCE alone, then the epoch's adversarial rows from it
    UCE(**SETTINGS["uce"]).erase(request(engine, targets))
    layers = projections(engine)
    before = {n: m.weight.detach().double().clone() for n, m in layers.items()}
    original = [base[f"unet.{n}.weight"].double() for n in layers]
    rows = [engine.encode([c]).double()[0] for c in targets]
    adv = torch.cat([adversarial_rows(list(before.values()), original, e, 0.1) for e in rows])
    guide = engine.encode([" "]).double()[0].repeat(2, 1)
    keep = engine.encode([" "]).double()[0].repeat(2, 1)

    fresh = tiny_engine()
    fresh_base = artifacts.snapshot(fresh.pipe)
    info = method.erase(request(fresh, targets))
    delta, non_finite = artifacts.extract(fresh.pipe, fresh_base)
    assert not non_finite and delta.changed == sorted(f"unet.{n}.weight" for n in layers)
    assert info["epochs"] == 1 and info["edited_matrices"] == 8
    assert len(info["adversarial_shift"]) == 1 and info["adversarial_shift"][0] > 0
    for name, m in projections(fresh).items():
        a, b = normal_equations(before[name], adv, guide, keep, 0.1, 1.0, 0.1)
        w = m.weight.detach().double()
        residual = w @ b - a
        assert residual.abs().max() < 1e-5 * b.abs().max() * (1 + w.abs().max())


def test_task_schedule_and_bad_settings() -> None:
    engine = tiny_engine()
    assert rece().schedule(request(engine, ["tench"])) == (0.1, 1)
    assert rece(lamb=0.5, epochs=2).schedule(request(engine, ["tench"])) == (0.5, 2)
    with pytest.raises(FiaBenchError, match=r"tasks\.objects: needs lamb and epochs"):
        rece(tasks={"objects": {"lamb": 0.1}}).schedule(request(engine, ["tench"]))
    with pytest.raises(FiaBenchError, match="epochs=-1"):
        rece(epochs=-1)


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [*FAST_RUN, "method=rece", "seeds=1", "n_concepts=[2]"], out_dir=str(tmp_path / "run")
    )
    runs = result.runs[result.runs["method"] == "rece"].set_index("n_concepts")
    assert set(runs["status"]) == {"ok"}
    info = json.loads(runs.loc[2, "info"])
    assert info["edited_matrices"] == runs.loc[2, "changed_tensors"] == 8
    assert info["uce"]["edited_matrices"] == 8
