"""Batched text-to-image sampling shared by every stage and by methods that need generations.

Each image's starting noise comes from its own row seed on a CPU generator, so an image never
depends on batch size, batch position or device; guidance runs conditional and unconditional
branches in one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from fia_bench.errors import unknown_choice

SCHEDULERS = ("ddim", "pndm", "lms", "dpmsolver")


@dataclass(frozen=True)
class Sampler:
    scheduler: str
    steps: int
    guidance_scale: float
    eta: float
    batch_size: int

    @classmethod
    def from_config(cls, cfg: Any) -> Sampler:
        if cfg.scheduler not in SCHEDULERS:
            raise unknown_choice("scheduler", cfg.scheduler, SCHEDULERS, "sampler.scheduler")
        return cls(
            scheduler=str(cfg.scheduler),
            steps=int(cfg.steps),
            guidance_scale=float(cfg.guidance_scale),
            eta=float(cfg.eta),
            batch_size=int(cfg.batch_size),
        )

    @property
    def label(self) -> str:
        return f"{self.scheduler}-{self.steps}steps-cfg{self.guidance_scale:g}-eta{self.eta:g}"

    def cache_identity(self) -> dict[str, Any]:
        """Batch size never changes an image, so it stays out of cache keys."""
        return {
            "scheduler": self.scheduler,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
        }


def make_scheduler(name: str, config: Any):
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "pndm": diffusers.PNDMScheduler,
        "lms": diffusers.LMSDiscreteScheduler,
        "dpmsolver": diffusers.DPMSolverMultistepScheduler,
    }
    return classes[name].from_config(config)


class Engine:
    def __init__(
        self, pipe: Any, sampler: Sampler, resolution: int, device: str, dtype: torch.dtype
    ) -> None:
        self.pipe = pipe
        self.sampler = sampler
        self.resolution = resolution
        self.device = torch.device(device)
        self.dtype = dtype
        self._embeddings: dict[str, torch.Tensor] = {}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        side = self.resolution // factor
        return (self.pipe.unet.config.in_channels, side, side)

    def forget_embeddings(self) -> None:
        """Call after any edit of the text encoder, whose outputs are memoised per prompt."""
        self._embeddings.clear()

    def tokenize(self, prompts: list[str]) -> Any:
        """Token ids and attention mask, padded to the text encoder's full context as SD does."""
        tokenizer = self.pipe.tokenizer
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            ids = self.tokenize(missing).input_ids.to(self.device)
            hidden = self.pipe.text_encoder(ids)[0]
            self._embeddings.update(zip(missing, hidden, strict=True))
        return torch.stack([self._embeddings[p] for p in prompts])

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        noise = [
            torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(int(s)))
            for s in seeds
        ]
        return torch.stack(noise).to(self.device, self.dtype)

    def scheduler(self, steps: int | None = None) -> Any:
        """A fresh scheduler of the run's kind with its timesteps set (they hold per-run state)."""
        scheduler = make_scheduler(self.sampler.scheduler, self.pipe.scheduler.config)
        scheduler.set_timesteps(steps or self.sampler.steps, device=self.device)
        return scheduler

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int | None = None,
        guidance_scale: float | None = None,
        stop_after: int | None = None,
        negative_prompts: list[str] | None = None,
    ) -> torch.Tensor:
        """Denoise from each row's seed; ``stop_after=k`` returns the latents after k of the
        ``steps`` steps (methods that probe or train on intermediate steps use it). Negative
        prompts replace the empty prompt in the unconditional branch."""
        scheduler = self.scheduler(steps)
        scale = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.encode(prompts)
        uncond = self.encode(negative_prompts or [""] * len(prompts))
        context = torch.cat([uncond, cond])
        latents = self.initial_noise(seeds) * scheduler.init_noise_sigma
        extra = {"eta": self.sampler.eta} if self.sampler.scheduler == "ddim" else {}
        for t in scheduler.timesteps[:stop_after]:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise = self.pipe.unet(model_in, t, encoder_hidden_states=context).sample
            noise_uncond, noise_cond = noise.chunk(2)
            guided = noise_uncond + scale * (noise_cond - noise_uncond)
            latents = scheduler.step(guided, t, latents, **extra).prev_sample
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        pixels = vae.decode(latents / vae.config.scaling_factor).sample
        pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in array]

    def generate(
        self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None
    ) -> list[Image.Image]:
        return self.decode(self.sample_latents(prompts, seeds, negative_prompts=negative_prompts))
