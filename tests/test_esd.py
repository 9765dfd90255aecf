"""ESD on the tiny world: only the declared parameter set changes (ESD-x: attn2 only; ESD-u: no
attn2), the ESD loss on a fixed (x_t, t) batch falls, a seed fixes the result on CPU, and the
paper / diffusers2025 variants differ where the spec says (anchor, x_t source, timesteps, sets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_engine, tiny_pipe

from fia_bench import artifacts
from fia_bench.api import EraseRequest
from fia_bench.engine import Engine, Sampler
from fia_bench.errors import FiaBenchError
from fia_bench.tasks import load_task
from methods.esd import ESD, esd_target, trainable_names

TASK = load_task("objects", "tiny")
TARGETS, RETAIN = TASK.split(2)
FAST = {"ddim_steps": 4}  # x_t sampler steps; the paper's 50 only cost time here


def no_base_images(*args, **kwargs):
    raise AssertionError("ESD never asks for base-model images")


def request(engine, targets=TARGETS, seed: int = 0, task=TASK) -> EraseRequest:
    return EraseRequest(tuple(targets), RETAIN, seed, task, engine, no_base_images)


def run(method: ESD, engine=None, **kw):
    engine = engine or tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    info = method.erase(request(engine, **kw))
    delta, non_finite = artifacts.extract(engine.pipe, base)
    assert not non_finite
    return engine, info, delta


@pytest.mark.parametrize("variant", ["paper", "diffusers2025"])
def test_esd_x_changes_only_cross_attention_and_esd_u_none_of_it(variant: str) -> None:
    _, info_x, delta_x = run(ESD(variant=variant, train="esd-x", iterations=3, lr=1e-3, **FAST))
    assert delta_x.changed and all(".attn2." in n for n in delta_x.changed)
    assert set(delta_x.changed) == {f"unet.{n}" for n in info_x["trained_names"]}
    assert info_x["trained_tensors"] == len(delta_x.changed)

    esd_u = ESD(variant=variant, train="esd-u", iterations=3, lr=1e-4, **FAST)
    engine, info_u, delta_u = run(esd_u)
    assert delta_u.changed and not any("attn2" in n for n in delta_u.changed)
    assert set(delta_u.changed) == {f"unet.{n}" for n in info_u["trained_names"]}
    unet = dict(engine.pipe.unet.named_parameters())
    assert info_u["trained_parameters"] == sum(unet[n].numel() for n in info_u["trained_names"])
    assert all(p.grad is None for p in engine.pipe.unet.parameters())
    for info in (info_x, info_u):
        assert info["loss_first"] >= 0 and info["loss_last"] >= 0 and info["loss_mean"] >= 0
        assert sum(info["concept_iterations"].values()) == 3


def test_parameter_sets_follow_each_variant() -> None:
    unet = tiny_pipe().unet
    names = [n for n, _ in unet.named_parameters()]
    paper_u = set(trainable_names(unet, "esd-u", "paper"))
    new_u = set(trainable_names(unet, "esd-u", "diffusers2025"))
    # paper-era noxattn: keeps norms, time_emb_proj and conv_in; drops the timestep MLP and head
    head = ("time_embedding.", "conv_norm_out.", "conv_out.")
    assert "conv_in.weight" in paper_u and any("time_emb_proj" in n for n in paper_u)
    assert paper_u == {n for n in names if "attn2" not in n and not n.startswith(head)}
    # 2025 rewrite: Linear/Conv2d modules only, the timestep MLP and output conv included
    norms = {
        f"{m}.{p}"
        for m, module in unet.named_modules()
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm)
        for p, _ in module.named_parameters(recurse=False)
    }
    assert norms and not norms & new_u
    assert norms - {"conv_norm_out.weight", "conv_norm_out.bias"} <= paper_u
    assert {"time_embedding.linear_1.weight", "conv_in.weight", "conv_out.weight"} <= new_u
    paper_x = trainable_names(unet, "esd-x", "paper")
    assert paper_x == trainable_names(unet, "esd-x", "diffusers2025")
    assert paper_x == [n for n in names if "attn2" in n]
    strict = trainable_names(unet, "esd-x-strict", "paper")
    assert strict and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in strict)


def test_auto_picks_esd_x_for_styles_and_esd_u_otherwise() -> None:
    assert ESD().train_set("styles") == "esd-x"
    assert ESD().train_set("objects") == ESD().train_set("explicit") == "esd-u"
    assert ESD(train="esd-x").train_set("objects") == "esd-x"


def fixed_batch(method: ESD, engine: Engine, n: int = 8):
    """(concept, x_t, t, target) from the untouched model with a generator of its own."""
    xt_engine = method.xt_engine(engine)
    gen = torch.Generator().manual_seed(1234)
    frozen = {k: p.detach().clone() for k, p in engine.pipe.unet.named_parameters()}
    empty, unet = engine.encode([""]), engine.pipe.unet
    batch = []
    for i in range(n):
        concept = TARGETS[i % len(TARGETS)]
        x_t, t = method.draw(xt_engine, concept, gen)
        emb = engine.encode([concept])
        batch.append((emb, x_t, t, method.frozen_target(unet, frozen, x_t, t, emb, empty)))
    return batch


@torch.no_grad()
def esd_loss(engine: Engine, batch) -> float:
    unet = engine.pipe.unet
    losses = [
        F.mse_loss(unet(x_t, t, encoder_hidden_states=emb).sample.float(), target).item()
        for emb, x_t, t, target in batch
    ]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    ("variant", "train", "lr"),
    [("paper", "esd-x", 5e-4), ("paper", "esd-u", 1e-5), ("diffusers2025", "esd-x", 5e-4)],
)
def test_loss_on_a_fixed_batch_falls(variant: str, train: str, lr: float) -> None:
    engine = tiny_engine()
    method = ESD(variant=variant, train=train, iterations=16, lr=lr, **FAST)
    batch = fixed_batch(method, engine)
    before = esd_loss(engine, batch)
    method.erase(request(engine, seed=3))
    after = esd_loss(engine, batch)
    assert after < 0.85 * before, (before, after)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    method = ESD(train="esd-x", iterations=3, lr=1e-3, **FAST)
    _, info_a, a = run(method, seed=5)
    _, info_b, b = run(method, seed=5)
    _, _, c = run(method, seed=6)
    assert a.changed == b.changed == c.changed
    assert a.digest() == b.digest() and info_a == info_b
    assert a.digest() != c.digest()


def test_eta_conventions_differ_by_one() -> None:
    gen = torch.Generator().manual_seed(0)
    e_c, e_u = torch.randn(2, 1, 4, 8, 8, generator=gen)
    paper = esd_target(e_c, e_u, 1.0, "paper")
    assert torch.allclose(paper, esd_target(e_c, e_u, 2.0, "diffusers"), atol=1e-6)
    assert torch.allclose(paper, e_u - (e_c - e_u))
    assert not torch.allclose(paper, esd_target(e_c, e_u, 1.0, "diffusers"))


def test_variant_defaults() -> None:
    paper, new = ESD(), ESD(variant="diffusers2025")
    assert (paper.iterations, paper.lr, paper.negative_guidance) == (1000, 1e-5, 1.0)
    assert (paper.xt_source, paper.eta_convention) == ("current", "paper")
    assert (new.iterations, new.lr, new.negative_guidance) == (200, 5e-5, 2.0)
    assert (new.xt_source, new.eta_convention) == ("frozen", "diffusers")
    assert paper.start_guidance == new.start_guidance == 3.0 and paper.ddim_steps == 50
    assert ESD(variant="diffusers2025", xt_source="current", lr=1e-4).lr == 1e-4


@pytest.mark.parametrize(("variant", "on_policy"), [("paper", True), ("diffusers2025", False)])
def test_x_t_comes_from_the_trained_model_or_the_frozen_one(variant: str, on_policy: bool) -> None:
    engine = tiny_engine()
    base = {n: p.detach().clone() for n, p in engine.pipe.unet.named_parameters()}
    seen: list[bool] = []

    class Spy(ESD):
        def draw(self, xt_engine, concept, gen):
            unet = xt_engine.pipe.unet
            seen.append(all(torch.equal(p, base[n]) for n, p in unet.named_parameters()))
            return super().draw(xt_engine, concept, gen)

    run(Spy(variant=variant, train="esd-x", iterations=3, lr=1e-3, **FAST), engine)
    assert seen == ([True, False, False] if on_policy else [True, True, True])


@pytest.mark.parametrize("variant", ["paper", "diffusers2025"])
def test_timestep_and_stop_rules(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 5
    method = ESD(variant=variant, ddim_steps=steps)
    xt_engine = method.xt_engine(tiny_engine())
    scheduler = "ddim" if variant == "paper" else "pndm"
    assert xt_engine.sampler == Sampler(scheduler, steps, 3.0, 0.0, 1)
    stops: list[int] = []
    real = Engine.sample_latents

    def spy(self, prompts, seeds, **kw):
        stops.append(kw["stop_after"])
        return real(self, prompts, seeds, **kw)

    monkeypatch.setattr(Engine, "sample_latents", spy)
    gen = torch.Generator().manual_seed(0)
    timesteps = [int(t) for t in xt_engine.scheduler().timesteps]
    for _ in range(30):
        _, t = method.draw(xt_engine, "tench", gen)
        t, n = int(t), stops[-1]
        if variant == "paper":  # t in the DDPM bin of index k; stop after the step of index k-1
            k = t // (1000 // steps)
            assert n == min(steps, steps + 1 - k)
        else:  # x_t after k scheduler steps, the UNet at timesteps[k]
            assert t == timesteps[n]
    assert len(set(stops)) > 2


def test_half_precision_trains_fp32_masters_and_writes_back_in_pipeline_dtype() -> None:
    pipe = tiny_pipe().to(dtype=torch.bfloat16)
    for component in (pipe.unet, pipe.text_encoder, pipe.vae):
        component.requires_grad_(False)
    engine = Engine(pipe, Sampler("ddim", 2, 7.5, 0.0, 4), 16, "cpu", torch.bfloat16)
    _, info, delta = run(ESD(train="esd-x", iterations=3, lr=1e-3, **FAST), engine)
    assert delta.changed and all(".attn2." in n for n in delta.changed)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert info["master_dtype"] == "float32"
    assert all(torch.isfinite(torch.tensor(info[k])) for k in ("loss_first", "loss_last"))


def test_nothing_to_erase_changes_nothing() -> None:
    engine = tiny_engine()
    base = artifacts.snapshot(engine.pipe)
    info = ESD(**FAST).erase(request(engine, targets=()))
    delta, _ = artifacts.extract(engine.pipe, base)
    assert delta.changed == [] and info["iterations"] == 0


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(FiaBenchError, match=r"unknown ESD variant 'papr'.*did you mean 'paper'"):
        ESD(variant="papr")
    with pytest.raises(FiaBenchError, match=r"unknown ESD train set 'esdx'"):
        ESD(train="esdx")
    with pytest.raises(FiaBenchError, match=r"unknown ESD xt_source"):
        ESD(xt_source="base")
    with pytest.raises(FiaBenchError, match="lr > 0"):
        ESD(lr=0)


def test_diffusers2025_draws_x_t_with_the_pipelines_pndm_and_its_timesteps() -> None:
    """esd_sd.py samples x_t with the SD v1.4 pipeline's own PNDM (PLMS: 50 steps are 51
    timesteps 981, 961, 961, 941, …), k = randint(0, 49) steps, and the UNet sees timesteps[k]."""
    method = ESD(variant="diffusers2025")
    engine = tiny_engine()
    xt_engine = method.xt_engine(engine)
    timesteps = [int(t) for t in xt_engine.scheduler().timesteps]
    assert len(timesteps) == 51 and timesteps[:5] == [981, 961, 961, 941, 921]
    assert timesteps[-1] == 1
    gen = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    for _ in range(2):
        x_t, t = method.draw(xt_engine, "tench", gen)
        k = int(torch.randint(50, (1,), generator=replay))
        seed = int(torch.randint(2**31 - 1, (1,), generator=replay))
        assert int(t) == timesteps[k]
        pndm = Engine(engine.pipe, Sampler("pndm", 50, 3.0, 0.0, 1), 16, "cpu", torch.float32)
        assert torch.equal(x_t, pndm.sample_latents(["tench"], [seed], stop_after=k))
