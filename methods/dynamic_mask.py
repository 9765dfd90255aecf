"""Dynamic Mask — Sculpting Memory ("SP", ICCV 2025): masked fine-tuning of the cross-attention
projections with a concept-aware loss, one target concept after another (methods.md §4).

Per target concept ``k``, in the task's order, starting from the weights left by ``k - 1``:

* data: ``images_per_class`` base-model images of "a photo of <k>" and as many of
  "a photo of <superclass>" with negative prompt "<k>" (made once through the harness's image
  cache, seeds ``seed_base + i``), VAE-encoded; batches of ``batch_size`` from each set are zipped;
* warm-up (steps ``1..warmup_steps``): plain denoising loss on the target images, gradients summed
  into ``G``, no update; at the last warm-up step every ``attn2`` q/k/v/out weight gets a mask of
  its ``update_percent`` largest ``|G|`` entries;
* main phase: ``L_forget = ‖ε_θ(x_t, p_k) − sg ε_θ(x_t, p_sup)‖²`` (concept-aware loss),
  ``L_align = scale · ‖ε_θ(x̃_t, p_sup) − ε̃‖²`` (superclass denoising) and, when KD is on,
  ``L_KD = scale_kd · ‖ε_θ(x̃_t, p_sup) − ε_θT(x̃_t, p_sup)‖²`` against the frozen weights at the
  start of the concept; gradients are masked, Adam + OneCycle step; the to_out bias is unmasked;
* turnover every ``mask_update_interval`` steps while ``epoch < mask_update_until · epochs``:
  ``n = ⌊ζ · #active⌋`` active entries with the smallest ``|G|`` (G summed since the last update)
  swap with the ``n`` inactive ones with the largest, ``ζ = ζ₀ · ½(1 + cos(π e / E))``;
* the epoch with the lowest mean ``L_forget`` is kept (the warm-up loss takes part, as released).

``variant=code`` (default) is the released code, whose KD term is computed and then overwritten, so
it never trains; ``variant=paper`` adds the KD term the paper's abstract describes (its target is
the superclass batch, as the code computes it). Departures from the code, all deliberate: the
training data and all training randomness are seeded (the ``k``-th concept of the sequence draws
from ``torch.Generator(seed · 1,000,003 + k)`` on the CPU, so a seed gives the same draws on any
device and the same edit on CPU, and concept ``k`` trains alike whatever follows it, so that a
sweep's larger concept counts resume from its smaller ones: ``Method.sequential``); a weight whose
mask is switched off has its Adam first moment cleared (``strict_mask``) so that a masked entry
never moves, where PyTorch's Adam in the code lets it drift on momentum; the student forwards on the
target and superclass batches share one UNet call (the same gradients as two). Half-precision
UNets train fp32 master copies (fp16 with dynamic loss scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.progress import progress
from fia_bench.schema import Choice, Flag, Int, Real, Schema, Text
from fia_bench.unet_edit import encode_images

VARIANTS = ("code", "paper")
LATENTS = ("sample", "mean")
LR_SCHEDULES = ("onecycle", "constant")
MASKED = ("attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight")
FP16_INITIAL_SCALE = 2.0**16
FP16_GROWTH_INTERVAL = 2000
CONCEPT_SEED_STRIDE = 1_000_003  # concept k of erasure seed s draws from seed s * stride + k


@dataclass(frozen=True)
class Settings:
    kd: bool
    scale: float
    scale_kd: float
    batch_size: int
    epochs: int
    warmup_steps: int
    mask_update_interval: int
    mask_update_until: float
    update_percent: float
    initial_turnover_fraction: float
    lr: float
    lr_schedule: str
    select_best_epoch: bool
    exclude_warmup_from_best: bool
    strict_mask: bool
    latent: str
    shuffle: bool
    progress: bool


@dataclass
class ConceptData:
    """One target's training set: VAE posteriors (mean, std) of its and its superclass's images."""

    concept: str
    superclass: str
    prompt: str
    superclass_prompt: str
    target_mean: torch.Tensor
    target_std: torch.Tensor
    anchor_mean: torch.Tensor
    anchor_std: torch.Tensor


@dataclass
class Batch:
    t: torch.Tensor
    x_t: torch.Tensor  # noised target latents
    eps: torch.Tensor
    xs_t: torch.Tensor  # noised superclass latents
    eps_s: torch.Tensor


def trainable_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter of every cross-attention module (``attn2.*``), by UNet-relative name."""
    return {n: p for n, p in unet.named_parameters() if ".attn2." in f".{n}"}


def is_masked(name: str) -> bool:
    return name.endswith(MASKED)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


class ConceptTrainer:
    """Fine-tunes ``unet``'s ``attn2`` parameters in place on one concept (methods.md §4.2).

    ``draw`` builds a noised batch from image indices, ``step`` runs one global step (warm-up or
    masked update, then turnover when due) on a batch, ``train`` runs every epoch and loads the best
    one. All randomness comes from ``generator`` (CPU), so a seed fixes the result.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        noise_scheduler: Any,
        scaling_factor: float,
        data: ConceptData,
        context: torch.Tensor,
        anchor_context: torch.Tensor,
        settings: Settings,
        generator: torch.Generator,
    ) -> None:
        self.unet = unet
        self.noise_scheduler = noise_scheduler
        self.scaling_factor = scaling_factor
        self.data = data
        self.context = context  # (1, 77, d) for p_k
        self.anchor_context = anchor_context  # (1, 77, d) for p_sup
        self.s = settings
        self.generator = generator
        self.device = next(unet.parameters()).device
        self.params = trainable_parameters(unet)
        if not any(is_masked(n) for n in self.params):
            raise FiaBenchError("dynamic_mask: the UNet has no attn2 q/k/v/out weights to train")
        # only attn2 takes gradients while training; ``close`` puts the flags back
        self.requires_grad = {n: p.requires_grad for n, p in unet.named_parameters()}
        for n, p in unet.named_parameters():
            p.requires_grad_(n in self.params)
        self.dtype = next(iter(self.params.values())).dtype
        # fp32 master copies when the UNet is half precision; the parameters themselves otherwise
        self.masters = {
            n: p if p.dtype == torch.float32 else p.detach().float().clone()
            for n, p in self.params.items()
        }
        self.masked = [n for n in self.params if is_masked(n)]
        self.grad_sum = {n: torch.zeros_like(self.masters[n]) for n in self.masked}
        self.masks: dict[str, torch.Tensor] = {}
        self.teacher = (
            {n: p.detach().clone() for n, p in self.params.items()} if settings.kd else None
        )
        n_batches = math.ceil(len(data.target_mean) / settings.batch_size)
        n_anchor = math.ceil(len(data.anchor_mean) / settings.batch_size)
        self.steps_per_epoch = min(n_batches, n_anchor)
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.Adam(list(self.masters.values()), lr=settings.lr)
        self.lr_scheduler = None
        if settings.lr_schedule == "onecycle" and self.total_steps > settings.warmup_steps:
            # as released: sized for every step of every epoch, stepped only after warm-up
            self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer,
                max_lr=settings.lr,
                total_steps=self.total_steps,
                anneal_strategy="cos",
            )
        self.loss_scale = FP16_INITIAL_SCALE if self.dtype == torch.float16 else 1.0
        self.good_steps = 0
        self.skipped_steps = 0
        self.step_count = 0
        self.turnovers = 0
        self.swapped_entries = 0

    # ---- data --------------------------------------------------------------------------------
    def latents(self, mean: torch.Tensor, std: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mean, std = mean[idx], std[idx]
        if self.s.latent == "sample":
            noise = torch.randn(mean.shape, generator=self.generator).to(self.device)
            mean = mean + std * noise
        return mean * self.scaling_factor

    def draw(self, target_idx: torch.Tensor, anchor_idx: torch.Tensor) -> Batch:
        """Latents of the indexed images, one t per pair (shared by both sets), fresh noise."""
        b = min(len(target_idx), len(anchor_idx))
        target_idx, anchor_idx = target_idx[:b], anchor_idx[:b]
        d = self.data
        lat = self.latents(d.target_mean, d.target_std, target_idx)
        lat_s = self.latents(d.anchor_mean, d.anchor_std, anchor_idx)
        n_train = int(self.noise_scheduler.config.num_train_timesteps)
        t = torch.randint(0, n_train, (b,), generator=self.generator).to(self.device)
        eps = torch.randn(lat.shape, generator=self.generator).to(self.device)
        eps_s = torch.randn(lat_s.shape, generator=self.generator).to(self.device)
        x_t = self.noise_scheduler.add_noise(lat, eps, t).to(self.dtype)
        xs_t = self.noise_scheduler.add_noise(lat_s, eps_s, t).to(self.dtype)
        return Batch(t, x_t, eps, xs_t, eps_s)

    # ---- losses ------------------------------------------------------------------------------
    def predict(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        context = context.expand(len(x), -1, -1) if len(context) == 1 else context
        if params is None:
            return self.unet(x, t, encoder_hidden_states=context).sample
        out = torch.func.functional_call(
            self.unet, params, (x, t), {"encoder_hidden_states": context}
        )
        return out.sample

    def losses(self, batch: Batch, warmup: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss to back-propagate, its parts as floats). In warm-up ``forget`` is the
        denoising loss on the target, as the released code logs it."""
        if warmup:
            loss = mse(self.predict(batch.x_t, batch.t, self.context), batch.eps)
            return loss, {"forget": float(loss.detach()), "total": float(loss.detach())}
        b = len(batch.t)
        with torch.no_grad():
            anchor = self.predict(batch.x_t, batch.t, self.anchor_context)
        both = self.predict(
            torch.cat([batch.x_t, batch.xs_t]),
            torch.cat([batch.t, batch.t]),
            torch.cat([self.context.expand(b, -1, -1), self.anchor_context.expand(b, -1, -1)]),
        )
        pred, pred_s = both[:b], both[b:]
        forget = mse(pred, anchor)
        align = self.s.scale * mse(pred_s, batch.eps_s)
        total = forget + align
        parts = {"forget": float(forget.detach()), "align": float(align.detach())}
        if self.teacher is not None:
            with torch.no_grad():
                taught = self.predict(batch.xs_t, batch.t, self.anchor_context, self.teacher)
            kd = self.s.scale_kd * mse(pred_s, taught)
            total = total + kd
            parts["kd"] = float(kd.detach())
        parts["total"] = float(total.detach())
        return total, parts

    # ---- one global step ---------------------------------------------------------------------
    def step(self, batch: Batch, epoch: int) -> dict[str, Any]:
        self.step_count += 1
        warmup = self.step_count <= self.s.warmup_steps
        total, parts = self.losses(batch, warmup)
        for p in self.params.values():
            p.grad = None
        (total * self.loss_scale).backward()
        grads = {
            n: torch.zeros_like(self.masters[n])
            if p.grad is None
            else p.grad.detach().float() / self.loss_scale
            for n, p in self.params.items()
        }
        for p in self.params.values():
            p.grad = None
        record = {"warmup": warmup, "skipped": False, **parts}
        if self.loss_scale != 1.0 and not all(
            bool(torch.isfinite(g).all()) for g in grads.values()
        ):
            self.loss_scale /= 2
            self.good_steps = 0
            self.skipped_steps += 1
            return record | {"skipped": True}
        self.good_steps += 1
        if self.loss_scale != 1.0 and self.good_steps % FP16_GROWTH_INTERVAL == 0:
            self.loss_scale *= 2
        for n in self.masked:
            self.grad_sum[n] += grads[n]  # the raw (unmasked) gradient
        if warmup or not self.masks:
            # masks at the last warm-up step (or the next good one, if fp16 overflow skipped it)
            if self.step_count >= self.s.warmup_steps:
                self.init_masks()
            return record
        for n, master in self.masters.items():
            master.grad = grads[n] * self.masks[n] if n in self.masks else grads[n]
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        for master in self.masters.values():
            master.grad = None
        self.sync()
        interval = self.s.mask_update_interval
        if (
            interval
            and self.step_count % interval == 0
            and epoch < self.s.mask_update_until * self.s.epochs
        ):
            self.turnover(epoch)
        return record

    @torch.no_grad()
    def sync(self) -> None:
        for n, p in self.params.items():
            if self.masters[n] is not p:
                p.copy_(self.masters[n])

    # ---- masks -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_masks(self) -> None:
        """Keep the ``update_percent`` largest |G| entries of each matrix (exact count, ties
        broken by position), then reset G."""
        for n in self.masked:
            importance = self.grad_sum[n].abs().flatten()
            keep = round(self.s.update_percent * importance.numel())
            order = torch.argsort(importance, descending=True, stable=True)[:keep]
            mask = torch.zeros(importance.numel(), dtype=torch.bool, device=importance.device)
            mask[order] = True
            self.masks[n] = mask.view_as(self.grad_sum[n])
            self.grad_sum[n].zero_()

    def turnover_fraction(self, epoch: int) -> float:
        return (
            self.s.initial_turnover_fraction * 0.5 * (1 + math.cos(math.pi * epoch / self.s.epochs))
        )

    @torch.no_grad()
    def turnover(self, epoch: int) -> None:
        """Swap the n least important active entries for the n most important inactive ones
        (n = ⌊ζ · #active⌋, importance |G|), so every matrix keeps its density; reset G."""
        zeta = self.turnover_fraction(epoch)
        for n in self.masked:
            mask = self.masks[n].flatten().clone()
            importance = self.grad_sum[n].abs().flatten()
            active = mask.nonzero().squeeze(1)
            inactive = (~mask).nonzero().squeeze(1)
            count = min(math.floor(zeta * len(active)), len(inactive))
            if count > 0:
                drop = active[torch.argsort(importance[active], stable=True)[:count]]
                grow = inactive[
                    torch.argsort(importance[inactive], descending=True, stable=True)[:count]
                ]
                mask[drop] = False
                mask[grow] = True
                state = self.optimizer.state.get(self.masters[n], {})
                if self.s.strict_mask and "exp_avg" in state:
                    # a switched-off weight must not keep moving on Adam's momentum
                    state["exp_avg"].view(-1)[drop] = 0
                self.swapped_entries += count
            self.masks[n] = mask.view_as(self.grad_sum[n])
            self.grad_sum[n].zero_()
        self.turnovers += 1

    def mask_densities(self) -> dict[str, float]:
        return {n: float(m.float().mean()) for n, m in self.masks.items()}

    # ---- epochs ------------------------------------------------------------------------------
    def batches(self, n_target: int, n_anchor: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        def order(n: int) -> torch.Tensor:
            return (
                torch.randperm(n, generator=self.generator) if self.s.shuffle else torch.arange(n)
            )

        target, anchor = order(n_target), order(n_anchor)
        size = self.s.batch_size
        return list(zip(target.split(size), anchor.split(size), strict=False))

    def train(self) -> dict[str, Any]:
        d, s = self.data, self.s
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        epoch_forget: list[float | None] = []
        last: list[dict[str, Any]] = []
        bar = progress(
            total=self.total_steps,
            desc=f"dynamic_mask {d.concept}",
            unit="step",
            leave=False,
            disable=not s.progress,
        )
        with bar:
            for epoch in range(s.epochs):
                records = []
                for ti, si in self.batches(len(d.target_mean), len(d.anchor_mean)):
                    record = self.step(self.draw(ti, si), epoch)
                    records.append(record)
                    bar.update()
                    bar.set_postfix(epoch=epoch, loss=f"{record['total']:.4f}", refresh=False)
                used = [
                    r["forget"]
                    for r in records
                    if not r["skipped"] and not (s.exclude_warmup_from_best and r["warmup"])
                ]
                mean = float(np.mean(used)) if used else None
                epoch_forget.append(mean)
                if mean is not None and s.select_best_epoch and (best is None or mean < best[0]):
                    best = (mean, epoch, {n: m.detach().clone() for n, m in self.masters.items()})
                last = records
        if best is not None:
            with torch.no_grad():
                for n, master in self.masters.items():
                    master.copy_(best[2][n])
            self.sync()
        main = [r for r in last if not r["warmup"] and not r["skipped"]]
        final = {
            key: float(np.mean([r[key] for r in main]))
            for key in ("forget", "align", "kd", "total")
            if main and key in main[0]
        }
        densities = self.mask_densities()
        return {
            "concept": d.concept,
            "superclass": d.superclass,
            "steps": self.step_count,
            "steps_per_epoch": self.steps_per_epoch,
            "final_losses": final,
            "epoch_forget": epoch_forget,
            "best_epoch": best[1] if best is not None else s.epochs - 1,
            "best_forget": best[0] if best is not None else None,
            "turnovers": self.turnovers,
            "swapped_entries": self.swapped_entries,
            "skipped_steps": self.skipped_steps,
            "mask_density": (
                float(sum(float(m.sum()) for m in self.masks.values()))
                / sum(m.numel() for m in self.masks.values())
                if self.masks
                else None
            ),
            "mask_density_min": min(densities.values()) if densities else None,
            "mask_density_max": max(densities.values()) if densities else None,
        }

    def close(self) -> None:
        for n, p in self.unet.named_parameters():
            p.grad = None
            p.requires_grad_(self.requires_grad[n])


class DynamicMask(Method):
    # 1: each concept draws from its own generator (it had shared one across the sequence)
    version = 1
    sequential = True
    SETTINGS = Schema(
        variant=Choice(*VARIANTS),
        kd=Flag(null=True),
        scale=Real(ge=0),
        scale_kd=Real(ge=0),
        images_per_class=Int(ge=1),
        batch_size=Int(ge=1),
        epochs=Int(ge=1),
        warmup_steps=Int(ge=0),
        mask_update_interval=Int(ge=0),
        mask_update_until=Real(ge=0, le=1),
        update_percent=Real(gt=0, le=1),
        initial_turnover_fraction=Real(ge=0, le=1),
        lr=Real(gt=0),
        lr_schedule=Choice(*LR_SCHEDULES),
        select_best_epoch=Flag(),
        exclude_warmup_from_best=Flag(),
        strict_mask=Flag(),
        latent=Choice(*LATENTS),
        prompt=Text(),
        superclass_default=Text(),
        seed_base=Int(ge=0),
        shuffle=Flag(),
        progress=Flag(),
    )

    def __init__(
        self,
        variant: str = "code",
        kd: bool | None = None,
        scale: float = 0.25,
        scale_kd: float = 0.25,
        images_per_class: int = 100,
        batch_size: int = 2,
        epochs: int = 10,
        warmup_steps: int = 50,
        mask_update_interval: int = 100,
        mask_update_until: float = 0.8,
        update_percent: float = 0.5,
        initial_turnover_fraction: float = 0.2,
        lr: float = 3e-6,
        lr_schedule: str = "onecycle",
        select_best_epoch: bool = True,
        exclude_warmup_from_best: bool = False,
        strict_mask: bool = True,
        latent: str = "sample",
        prompt: str = "a photo of {concept}",
        superclass_default: str = "object",
        seed_base: int = 500_000,
        shuffle: bool = True,
        progress: bool = True,
    ) -> None:
        if variant not in VARIANTS:
            raise unknown_choice(
                "dynamic_mask variant", variant, VARIANTS, "method.settings.variant"
            )
        if latent not in LATENTS:
            raise unknown_choice("dynamic_mask latent", latent, LATENTS, "method.settings.latent")
        if lr_schedule not in LR_SCHEDULES:
            raise unknown_choice(
                "dynamic_mask lr_schedule", lr_schedule, LR_SCHEDULES, "method.settings.lr_schedule"
            )
        for key, value in (
            ("images_per_class", images_per_class),
            ("batch_size", batch_size),
            ("epochs", epochs),
            ("warmup_steps", warmup_steps),
        ):
            if int(value) < 1:
                raise FiaBenchError(f"method.settings.{key} must be >= 1, got {value}")
        if not 0 < update_percent <= 1:
            raise FiaBenchError(
                f"method.settings.update_percent must be in (0, 1], got {update_percent}"
            )
        if mask_update_interval < 0 or not 0 <= initial_turnover_fraction <= 1:
            raise FiaBenchError(
                "method.settings.mask_update_interval must be >= 0 (0: no turnover) and "
                "initial_turnover_fraction in [0, 1]"
            )
        if "{concept}" not in prompt:
            raise FiaBenchError(f"method.settings.prompt must contain {{concept}}, got '{prompt}'")
        self.variant = variant
        self.prompt = prompt
        self.superclass_default = superclass_default
        self.images_per_class = int(images_per_class)
        self.seed_base = int(seed_base)
        self.settings = Settings(
            kd=(variant == "paper") if kd is None else bool(kd),
            scale=float(scale),
            scale_kd=float(scale_kd),
            batch_size=int(batch_size),
            epochs=int(epochs),
            warmup_steps=int(warmup_steps),
            mask_update_interval=int(mask_update_interval),
            mask_update_until=float(mask_update_until),
            update_percent=float(update_percent),
            initial_turnover_fraction=float(initial_turnover_fraction),
            lr=float(lr),
            lr_schedule=lr_schedule,
            select_best_epoch=bool(select_best_epoch),
            exclude_warmup_from_best=bool(exclude_warmup_from_best),
            strict_mask=bool(strict_mask),
            latent=latent,
            shuffle=bool(shuffle),
            progress=bool(progress),
        )

    def superclass(self, request: EraseRequest, concept: str) -> str:
        return request.task.superclasses.get(concept, self.superclass_default)

    def seeds(self) -> list[int]:
        return [self.seed_base + i for i in range(self.images_per_class)]

    def training_images(self, request: EraseRequest) -> dict[str, tuple[list, list]]:
        """Every target still to erase's and superclass's images in one call to the harness's
        cached base-model generator (superclass images use the target's name as negative
        prompt)."""
        n, seeds = self.images_per_class, self.seeds()
        targets = request.pending
        prompts: list[str] = []
        negatives: list[str] = []
        for concept in targets:
            prompts += [self.prompt.format(concept=concept)] * n
            prompts += [self.prompt.format(concept=self.superclass(request, concept))] * n
            negatives += [""] * n + [concept] * n
        images = request.base_images(prompts, seeds * 2 * len(targets), negatives)
        return {
            concept: (
                images[2 * i * n : (2 * i + 1) * n],
                images[(2 * i + 1) * n : (2 * i + 2) * n],
            )
            for i, concept in enumerate(targets)
        }

    def concept_data(self, request: EraseRequest) -> list[ConceptData]:
        """The encoded training set of every target still to erase, in the task's order."""
        images = self.training_images(request)
        vae = request.engine.pipe.vae
        batch = max(1, request.engine.sampler.batch_size)
        out = []
        for concept in request.pending:
            superclass = self.superclass(request, concept)
            target_mean, target_std = encode_images(vae, images[concept][0], batch)
            anchor_mean, anchor_std = encode_images(vae, images[concept][1], batch)
            out.append(
                ConceptData(
                    concept,
                    superclass,
                    self.prompt.format(concept=concept),
                    self.prompt.format(concept=superclass),
                    target_mean,
                    target_std,
                    anchor_mean,
                    anchor_std,
                )
            )
        return out

    def trainer(
        self, request: EraseRequest, data: ConceptData, generator: torch.Generator
    ) -> ConceptTrainer:
        """A trainer for one concept on the current weights (only its ``attn2`` parameters
        require grad until ``close``)."""
        from diffusers import DDPMScheduler

        pipe = request.engine.pipe
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if noise_scheduler.config.prediction_type != "epsilon":
            raise FiaBenchError(
                "dynamic_mask trains epsilon prediction; the model predicts "
                f"'{noise_scheduler.config.prediction_type}'"
            )
        return ConceptTrainer(
            pipe.unet,
            noise_scheduler,
            float(pipe.vae.config.scaling_factor),
            data,
            request.engine.encode([data.prompt]),
            request.engine.encode([data.superclass_prompt]),
            self.settings,
            generator,
        )

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"variant": self.variant, "kd": self.settings.kd, "concepts": []}
        unet = request.engine.pipe.unet
        params = trainable_parameters(unet)
        concepts = list(request.prior.get("concepts", []))
        # sequential, in the task's order, after the `done` ones the weights already carry
        for k, data in enumerate(self.concept_data(request), start=request.done):
            seed = int(request.seed) * CONCEPT_SEED_STRIDE + k
            trainer = self.trainer(request, data, torch.Generator("cpu").manual_seed(seed))
            try:
                summary = trainer.train()
            finally:
                trainer.close()
            summary["superclass_source"] = (
                "task" if data.concept in request.task.superclasses else "superclass_default"
            )
            concepts.append(summary)
        names = sorted(f"unet.{n}" for n in params)
        return {
            "variant": self.variant,
            "kd": self.settings.kd,
            "latent": f"latent_dist.{self.settings.latent} x scaling_factor",
            "master_weights": "fp32" if unet.dtype != torch.float32 else "none (fp32 model)",
            "training_images": {
                "per_class": self.images_per_class,
                "seeds": f"{self.seed_base}..{self.seed_base + self.images_per_class - 1}",
            },
            "trained_parameters": names,
            "trained_tensors": len(names),
            "trained_parameter_count": int(sum(p.numel() for p in params.values())),
            "masked_tensors": sum(1 for n in params if is_masked(n)),
            "final_losses": {c["concept"]: c["final_losses"] for c in concepts},
            "mask_densities": {c["concept"]: c["mask_density"] for c in concepts},
            "turnovers": {c["concept"]: c["turnovers"] for c in concepts},
            "concepts": concepts,
        }
