"""What the method plugins that read, mask or train UNet layers share: the Linear of every
transformer block found by its SD module name, a task's settings block that a world may replace,
VAE posteriors of training images, the cross-attention probabilities of a forward pass, and
training a chosen set of parameters only."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fia_bench.errors import FiaBenchError, unknown_choice


def block_linears(unet: Any, suffix: str, method: str) -> dict[str, torch.nn.Linear]:
    """Every ``…<suffix>`` Linear of the UNet by name, sorted. Feed-forward chunking is refused:
    it splits an FFN's input into pieces that hooks would read as separate calls."""
    found = {
        name: module
        for name, module in unet.named_modules()
        if name.endswith(f".{suffix}") and isinstance(module, torch.nn.Linear)
    }
    if not found:
        raise FiaBenchError(f"{method}: the UNet has no '…{suffix}' Linear layers to mask")
    if suffix.startswith("ff.") and any(getattr(m, "_chunk_size", None) for m in unet.modules()):
        raise FiaBenchError(f"{method}: disable feed-forward chunking; it splits the FFN input")
    return dict(sorted(found.items()))


def task_block(tasks: dict[str, Any], task: str, world: str | None, kind: str) -> tuple[str, Any]:
    """(key, block) of ``tasks.<world>/<task>`` where the config has one, else ``tasks.<task>``:
    the mini world's text encoder knows only its own words, so it brings its own prompt sets."""
    name = f"{world}/{task}" if f"{world}/{task}" in tasks else task
    if name not in tasks:
        raise unknown_choice(f"{kind} for task", name, tasks, "method.settings.tasks")
    return name, tasks[name]


@torch.no_grad()
def encode_images(vae: Any, images: list, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std (fp32, on the VAE's device) of images scaled to [-1, 1]."""
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    means, stds = [], []
    for chunk in pixels.split(batch):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


@contextmanager
def cross_attention_probabilities(unet: Any) -> Iterator[list[torch.Tensor]]:
    """Every ``attn2`` call's attention probabilities ((batch·heads, pixels, tokens), with their
    graph) appended to the yielded list, through diffusers' plain attention processor; the
    processors are restored on exit."""
    from diffusers.models.attention_processor import AttnProcessor

    probs: list[torch.Tensor] = []

    def recording(attn: Any) -> Any:
        scores = type(attn).get_attention_scores

        def get_attention_scores(*args: Any, **kwargs: Any) -> torch.Tensor:
            p = scores(attn, *args, **kwargs)
            probs.append(p)
            return p

        return get_attention_scores

    saved = unet.attn_processors
    attns = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    try:
        for attn in attns:
            attn.set_processor(AttnProcessor())
            attn.get_attention_scores = recording(attn)
        yield probs
    finally:
        for attn in attns:
            attn.__dict__.pop("get_attention_scores", None)
        unet.set_attn_processor(saved)


@contextmanager
def training_only(unet: Any, names: Iterable[str]) -> Iterator[list[torch.nn.Parameter]]:
    """Only the named UNet parameters require grad (yielded in order); every flag is restored and
    every gradient dropped on exit."""
    params = dict(unet.named_parameters())
    chosen = [params[n] for n in names]
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        unet.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        yield chosen
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None


def concept_token_mask(tokenizer: Any, prompt: str, concept: str, pooler: bool) -> torch.Tensor:
    """Token positions of ``concept``'s word pieces in ``prompt`` and, with ``pooler``, every
    EOS/padding position (CLIP's tokenizer pads with EOS): what MACE and FMN steer away."""
    ids = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    word = tokenizer(concept, add_special_tokens=False).input_ids
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for i in range(len(ids) - len(word) + 1):
        if ids[i : i + len(word)] == word:
            mask[i : i + len(word)] = True
    if pooler:
        mask |= torch.tensor(ids) == tokenizer.eos_token_id
    return mask
