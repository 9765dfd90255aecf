"""AC — Concept Ablation (Kumari et al., ICCV 2023): fine-tune the UNet so that prompts naming the
target predict the noise the model predicts for the same prompts naming an anchor concept, on
noised images of the anchor (``diffusers/train.py``, the "model-based" loss, the default).

Per step: a batch of anchor images (the base model's, made through the harness's image cache
from anchor prompts), each noised at a uniform DDPM timestep, and
``L = ‖ε_θ(x_t, c_target) − sg[ε_θ(x_t, c_anchor)]‖²``, where ``c_target`` is the anchor caption
with the anchor word replaced by the target, and the anchor prediction comes from the model being
trained, without gradient. Only the ``parameter_group`` is trained: ``cross-attn`` (every
``attn2.to_k`` / ``attn2.to_v``, the code's choice for objects, styles and nudity), ``attn`` or
``full-weight``. Several targets share one run: each batch row draws its own target.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.progress import progress
from fia_bench.schema import Choice, Dict, Flag, Int, Items, Real, Schema, Text
from fia_bench.unet_edit import encode_images, training_only

PARAMETER_GROUPS = {
    "cross-attn": ("attn2.to_k.", "attn2.to_v."),
    "attn": ("to_q.", "to_k.", "to_v.", "to_out."),
    "full-weight": ("",),
}


class ConceptAblation(Method):
    SETTINGS = Schema(
        anchor=Text(null=True),
        anchor_default=Text(),
        templates=Dict(Items(Text(), min_items=1), null=True),
        images=Int(ge=1),
        steps=Int(ge=1),
        batch_size=Int(ge=1),
        lr=Real(gt=0),
        scale_lr=Flag(),
        parameter_group=Choice(*PARAMETER_GROUPS),
        weight_decay=Real(ge=0),
        max_grad_norm=Real(gt=0),
        seed_base=Int(ge=0),
    )

    def __init__(
        self,
        anchor: str | None = None,
        anchor_default: str = "object",
        templates: dict[str, list[str]] | None = None,
        images: int = 1000,
        steps: int = 200,
        batch_size: int = 4,
        lr: float = 2e-6,
        scale_lr: bool = True,
        parameter_group: str = "cross-attn",
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        seed_base: int = 600_000,
    ) -> None:
        if parameter_group not in PARAMETER_GROUPS:
            raise unknown_choice(
                "AC parameter_group",
                parameter_group,
                PARAMETER_GROUPS,
                "method.settings.parameter_group",
            )
        self.templates = {k: list(v) for k, v in (templates or {}).items()}
        if not self.templates.get("default") or any(
            t.count("{}") != 1 for v in self.templates.values() for t in v
        ):
            raise FiaBenchError(
                "method.settings.templates: needs a 'default' list, each template with one {} "
                "where the anchor or target goes"
            )
        if min(images, steps, batch_size) < 1:
            raise FiaBenchError(
                f"AC images={images}, steps={steps}, batch_size={batch_size}: each must be ≥ 1"
            )
        self.anchor = anchor
        self.anchor_default = anchor_default
        self.images = int(images)
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.lr = float(lr) * (batch_size if scale_lr else 1)  # --scale_lr, one process
        self.parameter_group = parameter_group
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = float(max_grad_norm)
        self.seed_base = int(seed_base)

    def anchor_of(self, request: EraseRequest, concept: str) -> str:
        if self.anchor is not None:
            return self.anchor
        return request.task.superclasses.get(concept, self.anchor_default)

    def template_set(self, request: EraseRequest) -> list[str]:
        """The world's own templates (``templates.mini``) where given: the mini world's text
        encoder knows only its own words."""
        return self.templates.get(request.task.world, self.templates["default"])

    def trainable(self, unet: Any) -> dict[str, torch.nn.Parameter]:
        keys = PARAMETER_GROUPS[self.parameter_group]
        return {n: p for n, p in unet.named_parameters() if any(k in n for k in keys)}

    def anchor_data(self, request: EraseRequest) -> list[dict[str, Any]]:
        """Per target: its anchor images' VAE posteriors and the caption pairs they came from."""
        templates = self.template_set(request)
        seeds = [self.seed_base + i for i in range(self.images)]
        data = []
        batch = max(1, request.engine.sampler.batch_size)
        for concept in request.targets:
            anchor = self.anchor_of(request, concept)
            picks = [templates[i % len(templates)] for i in range(self.images)]
            images = request.base_images([t.format(anchor) for t in picks], seeds)
            mean, std = encode_images(request.engine.pipe.vae, images, batch)
            data.append(
                {
                    "mean": mean,
                    "std": std,
                    "anchor": [t.format(anchor) for t in picks],
                    "target": [t.format(concept) for t in picks],
                }
            )
        return data

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"trained_tensors": 0}
        from diffusers import DDPMScheduler

        engine = request.engine
        unet = engine.pipe.unet
        data = self.anchor_data(request)
        scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        n_train = int(scheduler.config.num_train_timesteps)
        scaling = engine.pipe.vae.config.scaling_factor
        rng = random.Random(request.seed)
        params = self.trainable(unet)
        losses = []
        with training_only(unet, params) as trained:
            optimizer = torch.optim.AdamW(trained, lr=self.lr, weight_decay=self.weight_decay)
            for _ in progress(range(self.steps), desc="ac", unit="step", leave=False):
                rows = [
                    (rng.randrange(len(data)), rng.randrange(self.images))
                    for _ in range(self.batch_size)
                ]
                mean = torch.stack([data[c]["mean"][i] for c, i in rows])
                std = torch.stack([data[c]["std"][i] for c, i in rows])
                latents = ((mean + std * torch.randn_like(std)) * scaling).to(unet.device)
                noise = torch.randn_like(latents)
                t = torch.randint(0, n_train, (len(rows),), device=unet.device)
                noisy = scheduler.add_noise(latents, noise, t).to(unet.dtype)
                target_ctx = engine.encode([data[c]["target"][i] for c, i in rows])
                anchor_ctx = engine.encode([data[c]["anchor"][i] for c, i in rows])
                with torch.no_grad():
                    goal = unet(noisy, t, encoder_hidden_states=anchor_ctx.to(unet.dtype)).sample
                pred = unet(noisy, t, encoder_hidden_states=target_ctx.to(unet.dtype)).sample
                loss = F.mse_loss(pred.float(), goal.float())
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, self.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
        return {
            "trained_tensors": len(params),
            "parameter_group": self.parameter_group,
            "anchors": {c: self.anchor_of(request, c) for c in request.targets},
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "lr": self.lr,
        }
