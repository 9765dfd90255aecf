"""SPEED: only attn2.to_v changes; the closed form solves its stationarity equation, keeps the
empty-prompt prior exactly at λ = 0 and moves nothing inside the retained rows' span when their
null space is all it may use; the regimes and k-means; and a harness run."""

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
from methods.speed import SPEED, kmeans, speed_delta

TASK = load_task("objects", "tiny")
SETTINGS = yaml.safe_load((REPO / "conf/method/speed.yaml").read_text())["settings"]


def speed(**overrides) -> SPEED:
    return SPEED(**(SETTINGS | overrides))


def request(engine, targets, seed: int = 0) -> EraseRequest:
    retain = tuple(c for c in TASK.concepts if c not in targets)
    return EraseRequest(tuple(targets), retain, seed, TASK, engine)


def random_problem(seed: int = 0, d: int = 12, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, d, generator=g, dtype=torch.float64)
    t = torch.randn(2, d, generator=g, dtype=torch.float64)
    a = torch.randn(2, d, generator=g, dtype=torch.float64)
    retained = torch.randn(6, d, generator=g, dtype=torch.float64)
    eigvals, eigvecs = torch.linalg.eigh(retained.T @ retained / 6)
    basis = eigvecs[:, eigvals < 1e-8]  # the 6 retained rows leave a 6-dim null space
    prior = torch.randn(d, 3, generator=g, dtype=torch.float64)
    return weight, t.T @ t / 2, a.T @ t / 2, basis @ basis.T, prior, retained


@pytest.mark.parametrize("lamb", [0.5, 3.0])
def test_the_closed_form_solves_its_stationarity_equation(lamb: float) -> None:
    w, s_tt, s_at, p, k2, _ = random_problem()
    delta = speed_delta(w, s_tt, s_at, p, k2, 0.7, lamb)
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    lhs = delta @ (s_tt @ p + 0.7 * eye) + delta @ k2 @ k2.T @ p / lamb
    torch.testing.assert_close(lhs, w @ (s_at - s_tt) @ p)


def test_at_lambda_zero_the_prior_is_kept_and_retained_rows_only_feel_m() -> None:
    w, s_tt, s_at, p, k2, retained = random_problem(1)
    delta = speed_delta(w, s_tt, s_at, p, k2, 1.0, 0.0)
    assert (delta @ k2).abs().max() < 1e-10  # ΔW K2 = 0: the empty prompt's states keep
    # with no target energy outside the null space (S_tt P = 0 when targets lie in the
    # retained span) M = I/α and ΔW r = 0 for every retained row
    span_targets = retained[:2]
    s_tt_in = span_targets.T @ span_targets / 2
    delta_in = speed_delta(w, s_tt_in, s_at, p, k2, 1.0, 0.0)
    assert (delta_in @ retained.T).abs().max() < 1e-10


def test_only_the_value_projections_change_and_keys_with_kv() -> None:
    for params, suffixes in (("V", ("attn2.to_v",)), ("KV", ("attn2.to_k", "attn2.to_v"))):
        engine = tiny_engine()
        base = artifacts.snapshot(engine.pipe)
        info = speed(params=params).erase(request(engine, TASK.concepts[:2]))
        delta, non_finite = artifacts.extract(engine.pipe, base)
        names = sorted(
            f"unet.{n}.weight" for n, _ in engine.pipe.unet.named_modules() if n.endswith(suffixes)
        )
        assert not non_finite and delta.changed == names
        assert info["edited_matrices"] == len(names) and info["regime"] == "few"
        assert info["retained_texts"] == len(TASK.concepts) - 2


def test_an_edit_sends_the_target_toward_the_anchor() -> None:
    """The anchor of objects is "": the edited value projection of the target's last token moves
    toward the projection of ""'s row (the BOS state) and away from its own."""
    engine = tiny_engine()
    method = speed(aug_num=0)
    target = method.rows(engine, ["tench"], "last")[0]
    anchor = method.rows(engine, [""], "last")[0]
    values = {
        n: m.weight.detach().double().clone()
        for n, m in engine.pipe.unet.named_modules()
        if n.endswith("attn2.to_v")
    }
    method.erase(request(engine, ["tench"]))
    for name, m in engine.pipe.unet.named_modules():
        if name.endswith("attn2.to_v"):
            w0, w = values[name], m.weight.detach().double()
            before = (w0 @ target - w0 @ anchor).norm()
            after = (w @ target - w0 @ anchor).norm()
            assert after < before


def test_regimes_and_overrides() -> None:
    many = TASK.concepts[:2]
    assert speed().task_settings(request(tiny_engine(), many))["threshold"] == 0.1
    multi = speed(multi_concept_from=2).task_settings(request(tiny_engine(), many))
    assert multi["regime"] == "multi" and multi["threshold"] == 1e-4
    assert multi["retain_scale"] == 0.05 and multi["filter_retain"] is False
    assert speed(threshold=0.3).task_settings(request(tiny_engine(), many))["threshold"] == 0.3
    with pytest.raises(FiaBenchError, match="unknown SPEED params 'Q'"):
        speed(params="Q")
    with pytest.raises(FiaBenchError, match=r"tasks\.objects\.few\.lamb is not set"):
        speed(tasks={"objects": {"few": {"threshold": 0.1, "retain_scale": 1.0}}}).task_settings(
            request(tiny_engine(), many)
        )


def test_kmeans_finds_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g, dtype=torch.float64) for c in centres])
    found = kmeans(x, 3, torch.Generator().manual_seed(1))
    distances = torch.cdist(centres, found).min(1).values
    assert distances.max() < 0.2


def test_runs_in_the_harness_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    result = fia_bench.run(
        [*FAST_RUN, "method=speed", "seeds=1", "n_concepts=[1,2]"],
        out_dir=str(tmp_path / "run"),
    )
    runs = result.runs[result.runs["method"] == "speed"].set_index("n_concepts")
    assert set(runs["status"]) == {"ok"}
    for n in (1, 2):
        info = json.loads(runs.loc[n, "info"])
        assert info["edited_matrices"] == runs.loc[n, "changed_tensors"] == 4
