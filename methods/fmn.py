"""FMN — Forget-Me-Not (Zhang et al., CVPR 2024 workshops): attention re-steering. The UNet is
fine-tuned for a few steps so that the cross-attention maps of the concept's tokens shrink
(``src/train_attn.py``, the stage run by ``configs/attn.yaml``).

Per step: one of the base model's images of the concept ("a photo of {c}", styles "a photo in the
style of {c}"), VAE-encoded and noised at a uniform DDPM timestep, through the UNet with that
prompt; the loss is the Frobenius norm of all cross-attention calls' probabilities on the
concept's word pieces and every EOS/padding token (``use_pooler``), taken together. AdamW (lr
2e-6, weight decay 0.01, gradient norm clipped at 1) on the whole UNet (``only_optimize_ca``
false, as released) or the cross-attention layers. The code's optional textual-inversion stage
(``use_ti``) is not run: the concept's own words are steered away (docs/methods/fmn.md).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError
from fia_bench.progress import progress
from fia_bench.schema import Dict, Flag, Int, Real, Schema, Text
from fia_bench.unet_edit import (
    concept_token_mask,
    cross_attention_probabilities,
    encode_images,
    training_only,
)


class FMN(Method):
    SETTINGS = Schema(
        steps=Int(ge=1),
        lr=Real(gt=0),
        weight_decay=Real(ge=0),
        max_grad_norm=Real(gt=0),
        only_optimize_ca=Flag(),
        use_pooler=Flag(),
        images_per_concept=Int(ge=1),
        prompts=Dict(Text(), null=True),
        seed_base=Int(ge=0),
    )

    def __init__(
        self,
        steps: int = 35,
        lr: float = 2e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        only_optimize_ca: bool = False,
        use_pooler: bool = True,
        images_per_concept: int = 20,
        prompts: dict[str, str] | None = None,
        seed_base: int = 700_000,
    ) -> None:
        self.prompts = dict(prompts or {})
        if any("{concept}" not in p for p in self.prompts.values()) or not {
            "object",
            "style",
        } <= set(self.prompts):
            raise FiaBenchError(
                "method.settings.prompts: needs 'object' and 'style' prompts with {concept}"
            )
        if steps < 1 or images_per_concept < 1:
            raise FiaBenchError(
                f"FMN steps={steps}, images_per_concept={images_per_concept}: each must be ≥ 1"
            )
        self.steps = int(steps)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = float(max_grad_norm)
        self.only_optimize_ca = only_optimize_ca
        self.use_pooler = use_pooler
        self.images_per_concept = int(images_per_concept)
        self.seed_base = int(seed_base)

    def prompt(self, request: EraseRequest, concept: str) -> str:
        kind = "style" if request.task.kind == "styles" else "object"
        world_kind = f"{request.task.world}/{kind}"
        return self.prompts.get(world_kind, self.prompts[kind]).format(concept=concept)

    def trained_names(self, unet: Any) -> list[str]:
        names = [n for n, _ in unet.named_parameters()]
        return [n for n in names if "attn2" in n] if self.only_optimize_ca else names

    def training_set(self, request: EraseRequest) -> list[tuple[str, str, torch.Tensor, Any]]:
        """(concept, prompt, VAE mean, VAE std) of the base model's images of every target."""
        n = self.images_per_concept
        seeds = [self.seed_base + i for i in range(n)]
        prompts = [self.prompt(request, c) for c in request.targets]
        images = request.base_images([p for p in prompts for _ in seeds], seeds * len(prompts))
        batch = max(1, request.engine.sampler.batch_size)
        mean, std = encode_images(request.engine.pipe.vae, images, batch)
        return [
            (c, prompts[i], mean[i * n + j], std[i * n + j])
            for i, c in enumerate(request.targets)
            for j in range(n)
        ]

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"trained_tensors": 0}
        from diffusers import DDPMScheduler

        engine = request.engine
        unet = engine.pipe.unet
        data = self.training_set(request)
        scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        n_train = int(scheduler.config.num_train_timesteps)
        scaling = engine.pipe.vae.config.scaling_factor
        rng = random.Random(request.seed)
        names = self.trained_names(unet)
        losses = []
        with (
            training_only(unet, names) as trained,
            cross_attention_probabilities(unet) as probs,
        ):
            optimizer = torch.optim.AdamW(trained, lr=self.lr, weight_decay=self.weight_decay)
            for _ in progress(range(self.steps), desc="fmn", unit="step", leave=False):
                concept, prompt, mean, std = data[rng.randrange(len(data))]
                latent = ((mean + std * torch.randn_like(std)) * scaling)[None].to(unet.device)
                t = torch.randint(0, n_train, (1,), device=unet.device)
                noisy = scheduler.add_noise(latent, torch.randn_like(latent), t).to(unet.dtype)
                context = engine.encode([prompt]).to(unet.device, unet.dtype)
                positions = concept_token_mask(
                    engine.pipe.tokenizer, prompt, concept, self.use_pooler
                ).to(unet.device)
                probs.clear()
                unet(noisy, t, encoder_hidden_states=context)
                loss = torch.cat([p[..., positions].float().flatten() for p in probs]).norm()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, self.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
        return {
            "trained_tensors": len(names),
            "only_optimize_ca": self.only_optimize_ca,
            "loss_first": losses[0],
            "loss_last": losses[-1],
        }
