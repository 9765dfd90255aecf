"""The resumable training loop every mini-world stage runs: modules, optimiser, weight average
and step survive interruption, and the batches and noise of step k come from a CPU generator
seeded by (recipe seed, stage, k), so a resumed run draws exactly what an uninterrupted one
would."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fia_bench.miniworld.build_files import STAGES, flat, load_tensors, nest, save_tensors


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 10_007 + step)


def cycles_of(steps: int | list[int]) -> list[int]:
    """A recipe's ``steps``: one cosine cycle's length or a list of cycles."""
    return [steps] if isinstance(steps, int) else list(steps)


def lr_scale(step: int, cycles: list[int], warmup: int = 0) -> float:
    """Learning-rate factor at ``step``: a linear warm-up, then one cosine from 1 to 0.1 per
    cycle, restarting at 1 (warm restarts). Appending a cycle to a finished recipe leaves the
    earlier steps' schedule unchanged, so a finished build resumes into the longer recipe and
    ends with the weights a from-scratch build of that recipe makes."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    start = 0
    for length in cycles:
        if step < start + length:
            return scale * (0.5 * (1 + math.cos(math.pi * (step - start) / length)) * 0.9 + 0.1)
        start += length
    raise ValueError(f"step {step} is past the schedule's {start} steps")


def compiled(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` through ``torch.compile``, with CUDA graphs on a GPU: the mini world's UNet is
    so small that its step is bound by kernel launches there (``benchmarks/generator_step.py``:
    76 ms a step eager, 29.5 ms compiled, on one H200). The result shares ``module``'s
    parameters, so a loop trains and saves ``module`` itself."""
    return torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None)


class Loop:
    """A training loop whose modules, optimiser and step survive interruption. ``steps`` is one
    cosine cycle's length or a list of cycles (see ``lr_scale``)."""

    def __init__(
        self,
        build: Path,
        stage: str,
        modules: dict[str, nn.Module],
        lr: float,
        steps: int | list[int],
        on_save: Callable[[], None] = lambda: None,
        on_step: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = build / f"{stage}.state.safetensors"
        # the builder books the time spent up to each checkpoint, and notes when each step ends
        self.on_save, self.on_step = on_save, on_step
        self.cycles = cycles_of(steps)
        self.stage, self.modules, self.steps = stage, modules, sum(self.cycles)
        params = [p for m in modules.values() for p in m.parameters()]
        # on a GPU, one fused kernel for all tensors: the step is bound by launches there
        fused = True if params[0].is_cuda else None
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)
        self.step = 0
        self.ema: dict[str, dict[str, torch.Tensor]] | None = None
        if self.path.exists():
            device = next(p.device for m in modules.values() for p in m.parameters())
            tensors, meta = load_tensors(self.path, device)
            for name, module in modules.items():
                module.load_state_dict(nest(tensors, "modules")[name])
            moments = nest(tensors, "optimizer")
            self.optimizer.load_state_dict(
                {"state": {int(i): s for i, s in moments.items()}, "param_groups": meta["groups"]}
            )
            # a checkpoint saved during a run holds the schedule's scaled rate: the base rate is
            # the recipe's, or a run stopped by a kill would resume at a fraction of it
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.step, self.ema = meta["step"], nest(tensors, "ema") or None

    def save(self) -> None:
        optimizer = self.optimizer.state_dict()
        moments = {str(i): s for i, s in optimizer["state"].items()}
        tensors = {
            **flat({k: m.state_dict() for k, m in self.modules.items()}, "modules"),
            **flat(moments, "optimizer"),
            **flat(self.ema or {}, "ema"),
        }
        save_tensors(self.path, tensors, {"step": self.step, "groups": optimizer["param_groups"]})
        self.on_save()

    def update_ema(self, decay: float) -> None:
        """One foreach update over every floating tensor: a per-tensor loop with a clone of
        each is some 1,400 small kernel launches a step for the UNet's 462 tensors, on a GPU
        where the step is bound by launches (``benchmarks/generator_step.py``)."""
        warm = min(decay, (1 + self.step) / (10 + self.step))
        if self.ema is None:
            self.ema = {
                k: {n: t.detach().clone() for n, t in m.state_dict().items()}
                for k, m in self.modules.items()
            }
            return
        averages, currents = [], []
        for k, m in self.modules.items():
            for n, t in m.state_dict().items():
                if t.is_floating_point():
                    averages.append(self.ema[k][n])
                    currents.append(t)
                else:
                    self.ema[k][n] = t.clone()
        torch._foreach_mul_(averages, warm)
        torch._foreach_add_(averages, currents, alpha=1 - warm)

    def update(
        self,
        loss: torch.Tensor,
        ema_decay: float | None,
        mark: Callable[[str], None] = lambda phase: None,
    ) -> None:
        """One step on ``loss``: gradients clipped to norm 1, AdamW, the weight average.
        ``mark`` is told each phase as it ends, for ``benchmarks/generator_step.py`` to time
        the very step a build runs."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(
            [p for m in self.modules.values() for p in m.parameters()], 1.0
        )
        mark("clip")
        self.optimizer.step()
        self.step += 1
        mark("adamw")
        if ema_decay:
            self.update_ema(ema_decay)
        mark("average")

    def run(
        self,
        seed: int,
        loss_fn: Callable[[torch.Generator], torch.Tensor],
        limits: tuple[float, int],
        *,
        warmup: int = 0,
        ema_decay: float | None = None,
        save_every_s: float = 120.0,
    ) -> bool:
        """Train until done, the deadline or the step budget (``limits``); True when the stage
        has finished all its steps."""
        deadline, budget = limits
        stop_at = min(self.steps, self.step + budget)
        base_lr = [g["lr"] for g in self.optimizer.param_groups]
        last_save = time.monotonic()
        bar = tqdm(total=self.steps, initial=self.step, desc=self.stage)
        for module in self.modules.values():
            module.train()
        while self.step < stop_at and time.monotonic() < deadline:
            scale = lr_scale(self.step, self.cycles, warmup)
            for group, lr in zip(self.optimizer.param_groups, base_lr, strict=True):
                group["lr"] = lr * scale
            loss = loss_fn(step_generator(seed, self.stage, self.step))
            self.update(loss, ema_decay)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")  # .item() waits for the device
            self.on_step()
            if time.monotonic() - last_save > save_every_s:
                self.save()
                last_save = time.monotonic()
        for group, lr in zip(self.optimizer.param_groups, base_lr, strict=True):
            group["lr"] = lr
        bar.close()
        self.save()
        return self.step >= self.steps

    def final_state(self, name: str) -> dict[str, torch.Tensor]:
        return (self.ema or {}).get(name) or self.modules[name].state_dict()
