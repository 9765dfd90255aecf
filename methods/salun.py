"""SalUn — saliency unlearning (Fan et al., ICLR 2024), its Stable Diffusion recipe
(``SD/train-scripts/generate_mask.py`` then ``SD/train-scripts/random_label.py``).

1. **Saliency mask.** Over the forget images (one pass, batches of 8), the gradient of
   ``−‖ε − ((1 + w) ε_θ(x_t, c) − w ε_θ(x_t, ∅))‖²`` (w = 7.5) is summed, signed, over batches for
   every UNet parameter; the entries whose absolute sum is in the top ``threshold`` fraction of
   the whole UNet (0.5) form the mask.
2. **Random-label fine-tuning.** ``epochs`` passes over the forget images (batch 8, Adam lr 1e-5,
   the whole UNet):
   ``L = ‖ε_θ(x_t, c_forget) − sg[ε_θ(x_t, c_pseudo)]‖² + α ‖ε_θ(x_r, c_r) − ε_r‖²``, with
   ``c_pseudo`` the prompt of the next concept of the task's list (the code: class
   ``(forget + 1) mod 10``) on the same noised forget latents, and the second term the plain
   denoising loss on images of the retained concepts (α = 0.5, README). Every gradient is
   multiplied by the mask before the step, so only salient weights move.

Forget and retain images are the base model's ("an image of a {c}", through the harness's image
cache), where the code reads Imagenette's training photographs (docs/methods/salun.md).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError
from fia_bench.progress import progress
from fia_bench.schema import Dict, Int, Real, Schema, Text
from fia_bench.unet_edit import encode_images, training_only


def saliency_mask(gradients: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """True for the ``fraction`` of all entries with the largest |gradient| (the whole UNet
    ranked at once; a stable sort breaks ties toward the earlier entry)."""
    flat = torch.cat([g.abs().flatten() for g in gradients.values()])
    keep = int(len(flat) * fraction)
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:keep]] = True
    masks, start = {}, 0
    for name, g in gradients.items():
        masks[name] = chosen[start : start + g.numel()].view(g.shape)
        start += g.numel()
    return masks


class SalUn(Method):
    SETTINGS = Schema(
        threshold=Real(gt=0, le=1),
        guidance=Real(),
        alpha=Real(ge=0),
        lr=Real(gt=0),
        epochs=Int(ge=1),
        batch_size=Int(ge=1),
        images_per_concept=Int(ge=1),
        retain_images_per_concept=Int(ge=0),
        prompt=Dict(Text(), null=True),
        seed_base=Int(ge=0),
    )

    def __init__(
        self,
        threshold: float = 0.5,
        guidance: float = 7.5,
        alpha: float = 0.5,
        lr: float = 1e-5,
        epochs: int = 5,
        batch_size: int = 8,
        images_per_concept: int = 100,
        retain_images_per_concept: int = 20,
        prompt: dict[str, str] | None = None,
        seed_base: int = 800_000,
    ) -> None:
        self.prompt = dict(prompt or {})
        if "{concept}" not in self.prompt.get("default", ""):
            raise FiaBenchError("method.settings.prompt.default: needs {concept}")
        if not 0 < threshold <= 1 or min(epochs, batch_size, images_per_concept) < 1:
            raise FiaBenchError(
                f"SalUn threshold={threshold}, epochs={epochs}, batch_size={batch_size}, "
                f"images_per_concept={images_per_concept}: need 0 < threshold ≤ 1 and the "
                "others ≥ 1"
            )
        self.threshold = float(threshold)
        self.guidance = float(guidance)
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.images_per_concept = int(images_per_concept)
        self.retain_images_per_concept = int(retain_images_per_concept)
        self.seed_base = int(seed_base)

    def text(self, request: EraseRequest, concept: str) -> str:
        return self.prompt.get(request.task.world, self.prompt["default"]).format(concept=concept)

    def pseudo(self, request: EraseRequest, concept: str) -> str:
        """The next concept of the task's ordered list, wrapping around (the code's class + 1)."""
        order = list(request.task.concepts)
        return order[(order.index(concept) + 1) % len(order)] if concept in order else concept

    def images(self, request: EraseRequest, concepts: list[str], n: int) -> list[dict[str, Any]]:
        """Per image: the concept, its VAE posterior (mean, std) and its prompt."""
        if not concepts or n < 1:
            return []
        seeds = [self.seed_base + i for i in range(n)]
        prompts = [self.text(request, c) for c in concepts for _ in seeds]
        made = request.base_images(prompts, seeds * len(concepts))
        mean, std = encode_images(
            request.engine.pipe.vae, made, max(1, request.engine.sampler.batch_size)
        )
        return [
            {"concept": concepts[k // n], "mean": mean[k], "std": std[k], "prompt": prompts[k]}
            for k in range(len(prompts))
        ]

    def noised(self, rows: list[dict[str, Any]], scheduler: Any, scaling: float, device: Any):
        mean = torch.stack([r["mean"] for r in rows])
        std = torch.stack([r["std"] for r in rows])
        latents = ((mean + std * torch.randn_like(std)) * scaling).to(device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, int(scheduler.config.num_train_timesteps), (len(rows),), device=device)
        return scheduler.add_noise(latents, noise, t), noise, t

    def mask(self, request: EraseRequest, forget: list[dict[str, Any]], scheduler: Any) -> dict:
        engine = request.engine
        unet = engine.pipe.unet
        names = [n for n, _ in unet.named_parameters()]
        scaling = engine.pipe.vae.config.scaling_factor
        sums = {n: torch.zeros_like(p, device="cpu") for n, p in unet.named_parameters()}
        with training_only(unet, names) as params:
            for start in range(0, len(forget), self.batch_size):
                rows = forget[start : start + self.batch_size]
                noisy, noise, t = self.noised(rows, scheduler, scaling, unet.device)
                cond = engine.encode([r["prompt"] for r in rows]).to(unet.dtype)
                null = engine.encode([""] * len(rows)).to(unet.dtype)
                out = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond).sample
                out_null = unet(noisy.to(unet.dtype), t, encoder_hidden_states=null).sample
                guided = (1 + self.guidance) * out - self.guidance * out_null
                loss = -F.mse_loss(guided.float(), noise.float())
                unet.zero_grad(set_to_none=True)
                loss.backward()
                for n, p in zip(names, params, strict=True):
                    if p.grad is not None:
                        sums[n] += p.grad.detach().float().cpu()
        return saliency_mask(sums, self.threshold)

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        if not request.targets:
            return {"salient_fraction": 0.0}
        from diffusers import DDPMScheduler

        engine = request.engine
        unet = engine.pipe.unet
        scheduler = DDPMScheduler.from_config(engine.pipe.scheduler.config)
        scaling = engine.pipe.vae.config.scaling_factor
        forget = self.images(request, list(request.targets), self.images_per_concept)
        remain = self.images(request, list(request.retain), self.retain_images_per_concept)
        masks = self.mask(request, forget, scheduler)
        rng = random.Random(request.seed)
        names = [n for n, _ in unet.named_parameters()]
        losses = []
        with training_only(unet, names) as params:
            optimizer = torch.optim.Adam(params, lr=self.lr)
            device_masks = [
                masks[n].to(p.device, p.dtype) for n, p in zip(names, params, strict=True)
            ]
            for _ in progress(range(self.epochs), desc="salun", unit="epoch", leave=False):
                order = list(range(len(forget)))
                rng.shuffle(order)
                for start in range(0, len(order), self.batch_size):
                    rows = [forget[i] for i in order[start : start + self.batch_size]]
                    noisy, _, t = self.noised(rows, scheduler, scaling, unet.device)
                    noisy = noisy.to(unet.dtype)
                    cond = engine.encode([r["prompt"] for r in rows]).to(unet.dtype)
                    pseudo = engine.encode(
                        [self.text(request, self.pseudo(request, r["concept"])) for r in rows]
                    ).to(unet.dtype)
                    with torch.no_grad():
                        goal = unet(noisy, t, encoder_hidden_states=pseudo).sample
                    out = unet(noisy, t, encoder_hidden_states=cond).sample
                    loss = F.mse_loss(out.float(), goal.float())
                    if remain and self.alpha:
                        picked = [remain[rng.randrange(len(remain))] for _ in rows]
                        r_noisy, r_noise, r_t = self.noised(picked, scheduler, scaling, unet.device)
                        r_cond = engine.encode([r["prompt"] for r in picked]).to(unet.dtype)
                        r_out = unet(r_noisy.to(unet.dtype), r_t, encoder_hidden_states=r_cond)
                        loss = loss + self.alpha * F.mse_loss(r_out.sample.float(), r_noise)
                    optimizer.zero_grad()
                    loss.backward()
                    for p, m in zip(params, device_masks, strict=True):
                        if p.grad is not None:
                            p.grad.mul_(m)
                    optimizer.step()
                    losses.append(float(loss.detach()))
        total = sum(m.numel() for m in masks.values())
        return {
            "salient_fraction": sum(int(m.sum()) for m in masks.values()) / total,
            "steps": len(losses),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "pseudo": {c: self.pseudo(request, c) for c in request.targets},
            "retain_images": len(remain),
        }
