"""Batched text-to-image sampling shared by every stage and by methods that need generations.

Each image's starting noise comes from its own row seed on a CPU generator, so what an image
shows never depends on batch size, batch position or device; guidance runs conditional and
unconditional branches in one batch. Text embeddings are memoised per prompt. How the engine runs
(``EngineOptions``: micro-batch size, out-of-memory fall-back, channels_last, torch.compile), like
the device and the CPU thread count, changes only float rounding (convolution kernels round by
batch shape), so none of it enters a cache key; attention always runs through torch's
scaled-dot-product kernel."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.guidance import ClassifierFree, Guidance

SCHEDULERS = ("ddim", "pndm", "lms", "dpmsolver")
AUTO = "auto"
# Auto batch sizes stop here: on an H100, SD v1 throughput is flat past batch 32, and compiled it
# is lower at 64 (spec performance.md: 3.17 vs 3.24 img/s eager, 4.54 vs 4.13 compiled).
AUTO_BATCH_CAP = 32
# Share of the free CUDA memory an auto batch may plan to use; the rest absorbs allocator
# fragmentation and the estimate's error (the out-of-memory fall-back catches what remains).
MEMORY_HEADROOM = 0.8


def last_word_pieces(attention_mask: torch.Tensor) -> list[int]:
    """Each padded prompt's last word-piece, the row before its end token: the row UCE, ScaPre
    and SPEED edit and the mini world's text-row probe measures, so all of them agree on it."""
    return (attention_mask.sum(1) - 2).tolist()


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
        identity = {
            "scheduler": self.scheduler,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
        }
        if self.scheduler == "pndm":  # PLMS only since issue 17; older PRK-warm-up images differ
            identity["skip_prk_steps"] = True
        return identity


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, never what it makes. ``batch_size`` None is auto: on CUDA as many
    images as a measured per-image cost fits into the free memory, on a CPU the sampler's batch
    size. ``channels_last`` and ``compile`` change float rounding only, as the device does, and
    stay out of cache keys like the device."""

    batch_size: int | None = None
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> EngineOptions:
        size = cfg.batch_size
        if size != AUTO and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise FiaBenchError(
                f"engine.batch_size must be '{AUTO}' or a positive integer, got {size!r}"
            )
        for key in ("channels_last", "compile"):
            if not isinstance(cfg[key], bool):
                raise FiaBenchError(f"engine.{key} must be true or false, got {cfg[key]!r}")
        return cls(
            batch_size=None if size == AUTO else size,
            channels_last=cfg.channels_last,
            compile=cfg.compile,
        )


def use_sdpa(pipe: Any) -> None:
    """diffusers already defaults to ``AttnProcessor2_0`` (torch SDPA); the classic processor,
    which materialises every attention matrix, is swapped for it explicitly so that no loaded or
    edited pipeline falls back to it. Other processors (a method's own) are kept."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for model in (pipe.unet, pipe.vae):
        processors = model.attn_processors
        if any(type(p) is AttnProcessor for p in processors.values()):
            model.set_attn_processor(
                {
                    n: AttnProcessor2_0() if type(p) is AttnProcessor else p
                    for n, p in processors.items()
                }
            )


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether any submodule carries forward hooks (FIA's saliency probes): those run eagerly,
    where a compiled graph would have traced them once."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def make_scheduler(name: str, config: Any):
    """PNDM as SD v1.4/v1.5 ship it (``skip_prk_steps``: PLMS only, 50 steps → 51 timesteps
    981, 961, 961, 941, …), whatever scheduler the loaded pipeline carries now."""
    import diffusers

    if name == "pndm":
        return diffusers.PNDMScheduler.from_config(config, skip_prk_steps=True)
    classes = {
        "ddim": diffusers.DDIMScheduler,
        "lms": diffusers.LMSDiscreteScheduler,
        "dpmsolver": diffusers.DPMSolverMultistepScheduler,
    }
    return classes[name].from_config(config)


class Engine:
    def __init__(
        self,
        pipe: Any,
        sampler: Sampler,
        resolution: int,
        device: str,
        dtype: torch.dtype,
        options: EngineOptions = EngineOptions(),
    ) -> None:
        self.pipe = pipe
        self.sampler = sampler
        self.resolution = resolution
        self.device = torch.device(device)
        self.dtype = dtype
        self.options = options
        self._embeddings: dict[str, torch.Tensor] = {}
        self._batch_size = options.batch_size
        use_sdpa(pipe)
        if options.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        # the module itself stays eager (methods train and hook it); only sampling calls this
        self._compiled_unet = torch.compile(pipe.unet) if options.compile else None

    @property
    def batch_size(self) -> int:
        """Rows per micro-batch of ``generate``: the configured size, or the auto estimate made
        on first use; lowered for good after an out-of-memory error."""
        if self._batch_size is None:
            self._batch_size = self.auto_batch_size()
        return self._batch_size

    def auto_batch_size(self) -> int:
        if self.device.type != "cuda":
            return self.sampler.batch_size
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(free * MEMORY_HEADROOM) // self.image_bytes()
        return max(1, min(AUTO_BATCH_CAP, fits))

    @torch.no_grad()
    def image_bytes(self) -> int:
        """Peak CUDA memory one image adds: its CFG pair through the UNet, then its decode.
        Measured rather than computed, because it depends on the architecture, resolution,
        dtype and attention kernel; batch 1 includes fixed workspaces, so it errs high."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        latents = torch.zeros((2, *self.latent_shape), device=self.device, dtype=self.dtype)
        t = self.scheduler().timesteps[0]
        self.pipe.unet(latents, t, encoder_hidden_states=self.encode(["", ""]))
        self.pipe.vae.decode(latents[:1])
        return max(1, torch.cuda.max_memory_allocated(self.device) - start)

    def unet(self) -> Any:
        """The compiled UNet when compile is on and nothing hooks the module, else the module."""
        if self._compiled_unet is None or has_hooks(self.pipe.unet):
            return self.pipe.unet
        return self._compiled_unet

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

    @torch.no_grad()
    def rows_and_last(self, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states in float64 (prompts × context × width), for the closed-form edits'
        solves, and each prompt's last word-piece index."""
        last = last_word_pieces(self.tokenize(prompts).attention_mask)
        return self.encode(prompts).double(), last

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
        guidance: Guidance | None = None,
    ) -> torch.Tensor:
        """Denoise from each row's seed; ``stop_after=k`` returns the latents after k of the
        ``steps`` steps (methods that probe or train on intermediate steps use it). Negative
        prompts replace the empty prompt in the unconditional branch. ``guidance`` (an
        inference-time method's) replaces classifier-free guidance at every step."""
        scheduler = self.scheduler(steps)
        scale = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.encode(prompts)
        uncond = self.encode(negative_prompts or [""] * len(prompts))
        batch = (
            ClassifierFree(uncond, cond)
            if guidance is None
            else guidance.start(self, prompts, uncond, cond, steps or self.sampler.steps)
        )
        latents = self.initial_noise(seeds) * scheduler.init_noise_sigma
        extra = {"eta": self.sampler.eta} if self.sampler.scheduler == "ddim" else {}
        unet = self.unet()
        for step, t in enumerate(scheduler.timesteps[:stop_after]):
            model_in = scheduler.scale_model_input(torch.cat([latents] * batch.branches), t)
            noise = unet(model_in, t, encoder_hidden_states=batch.context(step)).sample
            guided = batch.noise(step, noise.chunk(batch.branches), scale)
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
        self,
        prompts: list[str],
        seeds: list[int],
        negative_prompts: list[str] | None = None,
        guidance: Guidance | None = None,
    ) -> list[Image.Image]:
        """Images of the rows in micro-batches of ``batch_size`` (counted in classifier-free
        pairs: a guidance that runs more UNet branches per image gets fewer images per batch). A
        micro-batch that runs out of memory is retried at half the size, which is kept for every
        later batch; an image's noise does not depend on its batch, so the fall-back changes
        float rounding at most."""
        images: list[Image.Image] = []
        branches = ClassifierFree.branches if guidance is None else guidance.branches
        pairs_per_image = branches / ClassifierFree.branches
        while len(images) < len(prompts):
            rows = slice(len(images), len(images) + max(1, int(self.batch_size / pairs_per_image)))
            negatives = negative_prompts[rows] if negative_prompts else None
            made = self.attempt(prompts[rows], seeds[rows], negatives, guidance)
            if made is None:
                self._batch_size = max(1, int(len(prompts[rows]) * pairs_per_image) // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(
                    f"out of memory at {len(prompts[rows])} images per batch; the engine now "
                    f"makes {self._batch_size}",
                    stacklevel=2,
                )
                continue
            images += made
        return images

    def attempt(
        self,
        prompts: list[str],
        seeds: list[int],
        negative_prompts: list[str] | None,
        guidance: Guidance | None = None,
    ) -> list[Image.Image] | None:
        """One micro-batch, or None when it ran out of memory with more than one row. Returning
        (instead of handling the error in the caller's except block) lets the failed batch's
        tensors, held by the traceback, be freed before the retry."""
        try:
            return self.decode(
                self.sample_latents(
                    prompts, seeds, negative_prompts=negative_prompts, guidance=guidance
                )
            )
        except torch.OutOfMemoryError:
            if len(prompts) == 1:
                raise
            return None
