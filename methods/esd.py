"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023): fine-tune the UNet so
that, conditioned on the concept, it predicts what the frozen model predicts under *negative*
classifier-free guidance away from the concept.

Every iteration picks one target concept ``c`` uniformly, makes a noisy latent ``x_t`` by partial
DDIM denoising (CFG ``start_guidance`` on ``c``, eta 0) from fresh noise, and takes one Adam step on

    loss = MSE( ε_θ(x_t, c, t), target )
    paper anchor:      target = ε*(x_t, ∅, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))
    diffusers anchor:  target = ε*(x_t, c, t) − η (ε*(x_t, c, t) − ε*(x_t, ∅, t))

where ε* is the frozen original UNet (the diffusers anchor with η equals the paper anchor with
η − 1). Two variants (``baselines_evaluators.md`` §1):

* ``variant=paper`` (default; the ICCV code, ``train-esd.py``): η=1 with the ∅ anchor, 1000
  iterations, lr 1e-5; x_t is sampled by the *model being trained*; the UNet is fed a DDPM timestep
  drawn inside the bin of the DDIM step index ``k``; the sampler stops after the step whose index
  is ``k − 1`` (so x_t sits 1–2 DDIM steps below t, as in the released code). Parameter sets are
  filtered by parameter name (``train``): ``esd-x`` = every ``attn2`` parameter, ``esd-u`` =
  everything but ``attn2``, the timestep MLP ``time_embedding`` and the output head
  ``conv_norm_out``/``conv_out`` (norms included).
* ``variant=diffusers2025`` (the rewrite ``esd_sd.py``): η=2 with the concept anchor, 200
  iterations, lr 5e-5, x_t sampled by the *frozen* model after ``k`` steps of the pipeline's own
  scheduler (PNDM for SD v1.4/v1.5: 51 timesteps 981, 961, 961, 941, …) and the UNet fed
  ``timesteps[k]`` of that list; parameter sets are Linear/Conv2d modules only (norms never
  trained), so ``esd-u`` then includes ``time_embedding``, ``conv_in`` and ``conv_out``. Its bf16
  Adam and hard-coded 1024² resolution are not reproduced (the run's resolution and fp32 master
  weights).

Memory: no second UNet. Only the trained tensors are copied once (in the pipeline's dtype) as the
frozen original; frozen predictions run the live UNet with those tensors substituted
(``torch.func.functional_call``), so ESD-x at SD scale adds a few tens of MB and ESD-u about one
copy of the trained weights. In fp32 the live parameters are trained directly; in fp16/bf16 Adam
updates fp32 master copies (fp16 adds dynamic loss scaling), the forward pass uses their cast to
the pipeline's dtype, the loss is computed in fp32, and the result is written back in the
pipeline's dtype after every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fia_bench.api import EraseRequest, Method
from fia_bench.engine import SCHEDULERS, Engine, Sampler
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.schema import Choice, Int, Real, Schema

VARIANTS = ("paper", "diffusers2025")
TRAIN_SETS = ("esd-x", "esd-u", "esd-all", "esd-x-strict")
XT_SOURCES = ("current", "frozen")
ETA_CONVENTIONS = ("paper", "diffusers")
# Paper-era defaults (train-esd.py argparse) and the 2025 rewrite's (esd_sd.py).
DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {
        "iterations": 1000,
        "lr": 1e-5,
        "negative_guidance": 1.0,
        "xt_source": "current",
        "eta_convention": "paper",
        "xt_scheduler": "ddim",  # the CompVis DDIM sampler
    },
    "diffusers2025": {
        "iterations": 200,
        "lr": 5e-5,
        "negative_guidance": 2.0,
        "xt_source": "frozen",
        "eta_convention": "diffusers",
        "xt_scheduler": "pndm",  # the SD v1.x pipeline's own (its scheduler_config.json)
    },
}
# ESD-u keeps these out (CompVis `time_embed`, `out.0`/`out.2` in diffusers names).
PAPER_U_EXCLUDED = ("time_embedding.", "conv_norm_out.", "conv_out.")


def trainable_names(unet: nn.Module, train: str, variant: str) -> list[str]:
    """UNet parameter names that ESD trains, in ``named_parameters`` order."""
    if train not in TRAIN_SETS:
        raise unknown_choice("ESD train set", train, TRAIN_SETS, "method.settings.train")
    if variant == "diffusers2025":
        # the rewrite selects Linear/Conv2d modules by module name, so norms are never trained
        names = {
            f"{module_name}.{param_name}"
            for module_name, module in unet.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d)
            and _keep(module_name, train, strict_u=False)
            for param_name, _ in module.named_parameters(recurse=False)
        }
        return [n for n, _ in unet.named_parameters() if n in names]
    return [n for n, _ in unet.named_parameters() if _keep(n, train, strict_u=True)]


def _keep(name: str, train: str, strict_u: bool) -> bool:
    if train == "esd-x":
        return "attn2" in name
    if train == "esd-x-strict":
        return "attn2.to_k" in name or "attn2.to_v" in name
    if train == "esd-all":
        return True
    if "attn2" in name:  # esd-u
        return False
    return not (strict_u and name.startswith(PAPER_U_EXCLUDED))


def esd_target(
    eps_concept: torch.Tensor, eps_empty: torch.Tensor, eta: float, convention: str
) -> torch.Tensor:
    """Negatively guided frozen prediction; ``convention`` picks the anchor (∅ or the concept)."""
    anchor = eps_empty if convention == "paper" else eps_concept
    return anchor - eta * (eps_concept - eps_empty)


@contextmanager
def swapped(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Point the live parameters at other storage (no copy) for the duration of the block."""
    saved = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = values[n]
        yield
    finally:
        for n, p in params.items():
            p.data = saved[n]


class ESD(Method):
    SETTINGS = Schema(
        variant=Choice(*VARIANTS),
        train=Choice("auto", *TRAIN_SETS),
        iterations=Int(ge=1, null=True),
        lr=Real(gt=0, null=True),
        negative_guidance=Real(null=True),
        start_guidance=Real(),
        ddim_steps=Int(ge=1),
        xt_source=Choice(*XT_SOURCES, null=True),
        eta_convention=Choice(*ETA_CONVENTIONS, null=True),
        xt_scheduler=Choice(*SCHEDULERS, null=True),
    )

    def __init__(
        self,
        variant: str = "paper",
        train: str = "auto",
        iterations: int | None = None,
        lr: float | None = None,
        negative_guidance: float | None = None,
        start_guidance: float = 3.0,
        ddim_steps: int = 50,
        xt_source: str | None = None,
        eta_convention: str | None = None,
        xt_scheduler: str | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise unknown_choice("ESD variant", variant, VARIANTS, "method.settings.variant")
        if train != "auto" and train not in TRAIN_SETS:
            raise unknown_choice(
                "ESD train set", train, ("auto", *TRAIN_SETS), "method.settings.train"
            )
        defaults = DEFAULTS[variant]
        self.variant = variant
        self.train = train
        self.iterations = int(defaults["iterations"] if iterations is None else iterations)
        self.lr = float(defaults["lr"] if lr is None else lr)
        self.negative_guidance = float(
            defaults["negative_guidance"] if negative_guidance is None else negative_guidance
        )
        self.start_guidance = float(start_guidance)
        self.ddim_steps = int(ddim_steps)
        self.xt_source = defaults["xt_source"] if xt_source is None else xt_source
        self.eta_convention = (
            defaults["eta_convention"] if eta_convention is None else eta_convention
        )
        self.xt_scheduler = defaults["xt_scheduler"] if xt_scheduler is None else xt_scheduler
        if self.xt_scheduler not in SCHEDULERS:
            raise unknown_choice(
                "ESD xt_scheduler", self.xt_scheduler, SCHEDULERS, "method.settings.xt_scheduler"
            )
        if self.xt_source not in XT_SOURCES:
            raise unknown_choice(
                "ESD xt_source", self.xt_source, XT_SOURCES, "method.settings.xt_source"
            )
        if self.eta_convention not in ETA_CONVENTIONS:
            raise unknown_choice(
                "ESD eta_convention",
                self.eta_convention,
                ETA_CONVENTIONS,
                "method.settings.eta_convention",
            )
        if self.iterations < 0 or self.ddim_steps < 1 or not self.lr > 0:
            raise FiaBenchError(
                "ESD needs iterations >= 0, ddim_steps >= 1 and lr > 0 "
                f"(got {self.iterations}, {self.ddim_steps}, {self.lr})"
            )

    def train_set(self, task_kind: str) -> str:
        """``auto``: ESD-x for styles, ESD-u otherwise (objects, nudity), as the paper advises."""
        if self.train != "auto":
            return self.train
        return "esd-x" if task_kind == "styles" else "esd-u"

    def xt_engine(self, engine: Engine) -> Engine:
        """``xt_scheduler`` (DDIM with eta 0 for the paper, PNDM for the rewrite) at CFG
        ``start_guidance`` on the same pipeline, whatever the run samples its evaluation images
        with (x_t must not change when the evaluation sampler does)."""
        sampler = Sampler(self.xt_scheduler, self.ddim_steps, self.start_guidance, 0.0, 1)
        return Engine(engine.pipe, sampler, engine.resolution, str(engine.device), engine.dtype)

    def draw(
        self, xt_engine: Engine, concept: str, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One (x_t, t): a sampler step index k, the latent after the variant's number of steps from
        a fresh seed, sampled with the weights the pipeline holds now, and the UNet timestep."""
        steps = self.ddim_steps
        k = int(torch.randint(steps, (1,), generator=gen))
        if self.variant == "paper":
            # the CompVis sampler breaks after the step whose index (counting down from steps-1)
            # is k-1; the UNet gets a DDPM timestep in the bin of index k
            n_steps = min(steps, steps - k + 1)
            total = int(xt_engine.pipe.scheduler.config.num_train_timesteps)
            low, high = round(total * k / steps), round(total * (k + 1) / steps)
            t = int(torch.randint(low, high, (1,), generator=gen))
        else:
            n_steps = k
            t = int(xt_engine.scheduler().timesteps[k])
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        x_t = xt_engine.sample_latents([concept], [seed], stop_after=n_steps)
        return x_t, torch.tensor([t], device=x_t.device)

    @torch.no_grad()
    def frozen_target(
        self,
        unet: nn.Module,
        frozen: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        emb_concept: torch.Tensor,
        emb_empty: torch.Tensor,
    ) -> torch.Tensor:
        """ESD target from the original weights (``frozen`` substituted into the live UNet)."""
        eps = torch.func.functional_call(
            unet,
            frozen,
            (torch.cat([x_t, x_t]), t.expand(2)),
            {"encoder_hidden_states": torch.cat([emb_concept, emb_empty])},
        ).sample.float()
        eps_concept, eps_empty = eps.chunk(2)
        return esd_target(eps_concept, eps_empty, self.negative_guidance, self.eta_convention)

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        from fia_bench.progress import progress

        engine = request.engine
        unet = engine.pipe.unet
        train = self.train_set(request.task.kind)
        names = trainable_names(unet, train, self.variant)
        info: dict[str, Any] = {
            "variant": self.variant,
            "train": train,
            "iterations": self.iterations,
            "lr": self.lr,
            "negative_guidance": self.negative_guidance,
            "eta_convention": self.eta_convention,
            "xt_source": self.xt_source,
            "xt_scheduler": self.xt_scheduler,
            "trained_tensors": len(names),
            "trained_parameters": 0,
            "trained_names": names,
        }
        if not request.targets or self.iterations == 0 or not names:
            return info | {"iterations": 0, "trained_tensors": 0, "trained_names": []}

        live = dict(unet.named_parameters())
        live = {n: live[n] for n in names}
        live_set = set(live.values())
        dtype = next(iter(live.values())).dtype
        device = next(iter(live.values())).device
        frozen = {n: p.detach().clone() for n, p in live.items()}
        separate_master = dtype != torch.float32
        master = (
            {n: p.detach().float().clone().requires_grad_(True) for n, p in live.items()}
            if separate_master
            else live
        )
        optimizer = torch.optim.Adam(list(master.values()), lr=self.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        xt_engine = self.xt_engine(engine)
        gen = torch.Generator().manual_seed(int(request.seed))
        empty = engine.encode([""])
        losses: list[float] = []
        picks = [0] * len(request.targets)
        label = f"ESD {train} ({self.variant})"
        # only the trained tensors (or their masters) may collect gradients; flags are restored
        requires_grad = {p: p.requires_grad for p in unet.parameters()}
        try:
            for p in requires_grad:
                p.requires_grad_(not separate_master and p in live_set)
            bar = progress(range(self.iterations), desc=label, unit="it", leave=False)
            for _ in bar:
                index = int(torch.randint(len(request.targets), (1,), generator=gen))
                picks[index] += 1
                concept = request.targets[index]
                emb = engine.encode([concept])
                if self.xt_source == "frozen":
                    with swapped(live, frozen):
                        x_t, t = self.draw(xt_engine, concept, gen)
                else:
                    x_t, t = self.draw(xt_engine, concept, gen)
                target = self.frozen_target(unet, frozen, x_t, t, emb, empty)

                optimizer.zero_grad(set_to_none=True)
                weights = {n: m.to(dtype) for n, m in master.items()}
                pred = torch.func.functional_call(
                    unet, weights, (x_t, t), {"encoder_hidden_states": emb}
                ).sample
                loss = F.mse_loss(pred.float(), target)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if separate_master:
                    with torch.no_grad():
                        for n, p in live.items():
                            p.copy_(master[n])
                value = float(loss.detach())
                losses.append(value)
                bar.set_postfix(loss=f"{value:.4g}")
        finally:
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
            for p in live.values():
                p.grad = None
        finite = [v for v in losses if math.isfinite(v)]
        return info | {
            "trained_parameters": sum(p.numel() for p in live.values()),
            "master_dtype": "float32",
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_mean": sum(finite) / len(finite) if finite else float("nan"),
            "concept_iterations": dict(zip(request.targets, picks, strict=True)),
        }
