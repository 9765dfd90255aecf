"""UnlearnDiffAtk (ECCV 2024): a white-box prompt attack through the *erased* model's own UNet
(baselines_evaluators.md §6.3).

For every target prompt, the unedited model's image for that prompt and seed is the target. The
attack searches for ``k`` prefix tokens (placed right after BOS) under which the erased model
denoises that target image best, i.e. it minimises the erased model's diffusion loss
``‖ε − ε_θ(x_t, t, prefix + prompt)‖²``. Each prefix token is a probability vector over the
vocabulary. A forward pass samples one token per position and feeds its one-hot through the text
encoder's embedding table (straight-through, the gradient clipped to [−1, 1]). After every Adam
step the vectors are projected back onto the probability simplex. Timesteps t = 10, 30, …, 990 are
visited in ascending order with ``steps_per_t`` steps each. After each block the most likely
tokens are decoded and judged, and the attack stops at the first success. Prompts that already
succeed unattacked count towards pre-ASR and are returned as they are.

No weight changes: only the token distributions require gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fia_bench.api import AdversarialPrompt, Attack, AttackRequest
from fia_bench.errors import FiaBenchError
from fia_bench.schema import Int, Real, Schema


def project_simplex(v: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex.

    Finds the threshold μ with Σ max(v − μ, 0) = 1 by bisection, as in the paper. The support
    found by bisection then gives μ in closed form, so rows sum to 1 to float precision.
    """
    rows = v.detach().double().reshape(-1, v.shape[-1])
    lo = rows.min(dim=1, keepdim=True).values - 1.0  # Σ(v − lo)⁺ ≥ n ≥ 1
    hi = rows.max(dim=1, keepdim=True).values  # Σ(v − hi)⁺ = 0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        over = (rows - mid).clamp(min=0).sum(dim=1, keepdim=True) > 1
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    support = rows > lo  # the entries that stay positive; the row maximum always does
    mu = ((rows * support).sum(dim=1, keepdim=True) - 1) / support.sum(dim=1, keepdim=True)
    return (rows - mu).clamp(min=0).reshape(v.shape).to(v.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the one-hot of a sampled token. Backward: the one-hot's gradient, clipped, is
    passed to the probabilities unchanged otherwise. ``scale`` undoes a loss scale first (fp16
    pipelines scale the loss so that small gradients survive the half-precision backward)."""

    @staticmethod
    def forward(
        ctx: Any, probs: torch.Tensor, index: torch.Tensor, clip: float, scale: float = 1.0
    ) -> torch.Tensor:
        ctx.clip, ctx.scale = clip, scale
        return F.one_hot(index, probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return (grad / ctx.scale).clamp(-ctx.clip, ctx.clip), None, None, None


def attack_timesteps(count: int, train_timesteps: int = 1000) -> list[int]:
    """``count`` evenly spaced DDPM timesteps at the centres of their bins, ascending:
    50 of 1000 gives 10, 30, …, 990."""
    if not 1 <= count <= train_timesteps:
        raise FiaBenchError(
            f"unlearndiffatk: n_timesteps must be in [1, {train_timesteps}], got {count}"
        )
    return [(2 * i + 1) * train_timesteps // (2 * count) for i in range(count)]


@dataclass
class Victim:
    """The erased pipeline seen as a differentiable function of the prefix tokens' one-hots."""

    pipe: Any
    device: torch.device
    k: int
    clip: float = 1.0

    def __post_init__(self) -> None:
        from diffusers import DDPMScheduler

        tokenizer = self.pipe.tokenizer
        table = self.pipe.text_encoder.get_input_embeddings().weight
        special = set(tokenizer.all_special_ids)
        size = min(len(tokenizer), table.shape[0])
        self.allowed = torch.tensor(
            [i for i in range(size) if i not in special], device=self.device
        )
        self.noise_schedule = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.loss_scale = 1024.0 if self.pipe.unet.dtype == torch.float16 else 1.0

    @property
    def vocabulary_size(self) -> int:
        return len(self.allowed)

    def input_ids(self, prompt: str) -> torch.Tensor:
        """BOS, ``k`` placeholders (replaced at the embedding layer), the prompt, EOS + padding;
        cut to the context length with EOS kept last, as the tokenizer's truncation does."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            [prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        placeholder = torch.full((self.k,), int(self.allowed[0]), dtype=ids.dtype)
        out = torch.cat([ids[:1], placeholder, ids[1:]])[: tokenizer.model_max_length]
        if tokenizer.eos_token_id not in out[1 + self.k :].tolist():
            out[-1] = tokenizer.eos_token_id
        return out[None].to(self.device)

    @torch.no_grad()
    def latent(self, image: Image.Image, resolution: int) -> torch.Tensor:
        """x0: the VAE posterior mean of the target image, times the scaling factor."""
        vae = self.pipe.vae
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None].to(self.device, vae.dtype)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def sample(self, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One token per prefix position drawn from ``probs`` (k, V) on the CPU generator; its
        one-hot (1, k, V) carries the straight-through gradient back to ``probs``."""
        index = torch.multinomial(probs.detach().float().cpu(), 1, generator=generator)[:, 0]
        device = probs.device
        return _StraightThrough.apply(probs, index.to(device), self.clip, self.loss_scale)[None]

    def decode(self, probs: torch.Tensor) -> str:
        """The most likely token of every position, as text."""
        ids = self.allowed[probs.detach().argmax(dim=-1)].tolist()
        return self.pipe.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode(self, onehots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder states (B, L, D) with the prefix positions fed ``onehots`` (B, k, V)
        through the token embedding table (a forward hook; the model itself is unchanged)."""
        layer = self.pipe.text_encoder.get_input_embeddings()
        table = layer.weight
        full = onehots.new_zeros(*onehots.shape[:-1], table.shape[0])
        full = full.index_copy(-1, self.allowed, onehots)
        prefix = full.to(table.dtype) @ table

        def swap(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
            return torch.cat([output[:, :1], prefix.to(output.dtype), output[:, 1 + self.k :]], 1)

        handle = layer.register_forward_hook(swap)
        try:
            return self.pipe.text_encoder(ids.expand(len(onehots), -1))[0]
        finally:
            handle.remove()

    def loss(
        self,
        onehots: torch.Tensor,
        ids: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: int,
    ) -> torch.Tensor:
        """Per-row ‖ε − ε_θ(x_t, t, prefix + prompt)‖² (mean over latent entries), shape (B,)."""
        batch = len(onehots)
        hidden = self.encode(onehots, ids)
        steps = torch.full((batch,), t, device=self.device, dtype=torch.long)
        x0, noise = x0.expand(batch, -1, -1, -1), noise.expand(batch, -1, -1, -1)
        x_t = self.noise_schedule.add_noise(x0, noise, steps)
        eps = self.pipe.unet(x_t, steps, encoder_hidden_states=hidden).sample
        return (eps.float() - noise.float()).pow(2).flatten(1).mean(1)


@contextlib.contextmanager
def frozen(pipe: Any) -> Iterator[None]:
    """No parameter of the pipeline requires gradients (and every module is in eval mode) for
    the duration; the previous flags come back afterwards."""
    modules = [m for m in vars(pipe).values() if isinstance(m, torch.nn.Module)]
    modules += [getattr(pipe, n) for n in ("unet", "text_encoder", "vae") if hasattr(pipe, n)]
    modules = list({id(m): m for m in modules}.values())
    flags = {p: p.requires_grad for m in modules for p in m.parameters()}
    modes = {s: s.training for m in modules for s in m.modules()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for m in modules:
            m.eval()
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for s, mode in modes.items():
            s.train(mode)


class UnlearnDiffAtk(Attack):
    SETTINGS = Schema(
        k=Int(ge=1),
        n_timesteps=Int(ge=1),
        steps_per_t=Int(ge=1),
        lr=Real(gt=0),
        weight_decay=Real(ge=0),
        grad_clip=Real(gt=0),
        bisection_iterations=Int(ge=1),
    )

    def __init__(
        self,
        k: int = 5,
        n_timesteps: int = 50,
        steps_per_t: int = 40,
        lr: float = 0.01,
        weight_decay: float = 0.1,
        grad_clip: float = 1.0,
        bisection_iterations: int = 64,
    ) -> None:
        if min(k, n_timesteps, steps_per_t) < 1:
            raise FiaBenchError("unlearndiffatk: k, n_timesteps and steps_per_t must be >= 1")
        self.k = int(k)
        self.n_timesteps = int(n_timesteps)
        self.steps_per_t = int(steps_per_t)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.grad_clip = float(grad_clip)
        self.bisection_iterations = int(bisection_iterations)
        self.history: list[dict[str, Any]] = []  # per attacked prompt, for inspection

    def generator(self, seed: int, row_seed: int) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(int(seed) * 1_000_003 + int(row_seed))

    def step(
        self,
        victim: Victim,
        probs: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        ids: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: int,
        generator: torch.Generator,
    ) -> float:
        """One Adam step on the token distributions, then the projection onto the simplex."""
        optimizer.zero_grad(set_to_none=True)
        loss = victim.loss(victim.sample(probs, generator), ids, x0, noise, t)[0]
        (loss * victim.loss_scale).backward()
        if bool(torch.isfinite(probs.grad).all()):  # an fp16 overflow skips the step
            optimizer.step()
        with torch.no_grad():
            probs.copy_(project_simplex(probs, self.bisection_iterations))
        return float(loss.detach())

    def attack_one(
        self,
        victim: Victim,
        prompt: str,
        x0: torch.Tensor,
        generator: torch.Generator,
        succeeds: Callable[[str], bool],
        label: str = "",
    ) -> tuple[str, dict[str, Any]]:
        """Optimise a prefix for one prompt; returns the adversarial prompt and a summary."""
        from fia_bench.progress import progress

        ids = victim.input_ids(prompt)
        size = victim.vocabulary_size
        probs = torch.full((self.k, size), 1.0 / size, device=victim.device, requires_grad=True)
        optimizer = torch.optim.Adam([probs], lr=self.lr, weight_decay=self.weight_decay)
        train_steps = victim.noise_schedule.config.num_train_timesteps
        schedule = attack_timesteps(self.n_timesteps, train_steps)
        candidate, losses, success, blocks = prompt, [], False, 0
        for t in progress(schedule, desc=f"unlearndiffatk {label}".strip(), unit="t", leave=False):
            for _ in range(self.steps_per_t):
                noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
                losses.append(self.step(victim, probs, optimizer, ids, x0, noise, t, generator))
            blocks += 1
            candidate = f"{victim.decode(probs)} {prompt}".strip()
            if succeeds(candidate):
                success = True
                break
        summary = {
            "success": success,
            "timesteps_used": blocks,
            "steps": len(losses),
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }
        return candidate, summary

    def attack(self, request: AttackRequest) -> list[AdversarialPrompt]:
        from fia_bench.progress import progress

        rows = request.prompts
        prompts = [str(p) for p in rows["prompt"]]
        seeds = [int(s) for s in rows["generation_seed"]]
        concepts = [str(c) for c in rows["concept"]]
        cases = [str(c) for c in rows["case_id"]]
        if not prompts:
            return []
        engine = request.engine
        adversarial = list(prompts)
        self.history = []
        with frozen(engine.pipe):
            pre = [bool(v) for v in request.judge(prompts, seeds, concepts)]
            todo = [i for i, hit in enumerate(pre) if not hit]
            targets = (
                request.base_images([prompts[i] for i in todo], [seeds[i] for i in todo])
                if todo
                else []
            )
            victim = Victim(engine.pipe, engine.device, self.k, self.grad_clip)
            for i, image in progress(
                list(zip(todo, targets, strict=True)), desc="unlearndiffatk", unit="prompt"
            ):
                verdicts: dict[str, bool] = {prompts[i]: False}

                def succeeds(text: str, i: int = i, verdicts: dict = verdicts) -> bool:
                    if text not in verdicts:
                        verdicts[text] = bool(request.judge([text], [seeds[i]], [concepts[i]])[0])
                    return verdicts[text]

                x0 = victim.latent(image, engine.resolution)
                generator = self.generator(request.seed, seeds[i])
                adversarial[i], summary = self.attack_one(
                    victim, prompts[i], x0, generator, succeeds, cases[i]
                )
                self.history.append({"case_id": cases[i], **summary})
        return [
            AdversarialPrompt(case, source, adv, seed, concept, hit)
            for case, source, adv, seed, concept, hit in zip(
                cases, prompts, adversarial, seeds, concepts, pre, strict=True
            )
        ]
