"""The render set the mini world trains on: procedural scenes rendered in parallel, their
attribute table, the captions drawn for them, and the judges' augmentations."""

from __future__ import annotations

import os
from itertools import repeat
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fia_bench.datasets.procedural import Scene, render_with_box, sample_scenes
from fia_bench.miniworld.judges import attribute_classes

RECONSTRUCTIONS = 10240  # training images the judges also see through the VAE


def scene_table(scenes: list[tuple[Scene, int]], world_name: str) -> dict[str, np.ndarray]:
    classes = attribute_classes(world_name)
    return {
        "subject": np.array([classes["subject"].index(s.subject) for s, _ in scenes]),
        "style": np.array([classes["style"].index(s.style) for s, _ in scenes]),
        "colour": np.array([classes["colour"].index(s.colour) for s, _ in scenes]),
        "place": np.array([classes["place"].index(s.place) for s, _ in scenes]),
    }


def _render_chunk(
    scenes: list[tuple[Scene, int]], size: int, world_name: str
) -> tuple[np.ndarray, np.ndarray]:
    images, boxes = [], []
    for scene, seed in scenes:
        image, box = render_with_box(scene, seed, size, world_name)
        images.append(np.asarray(image))
        boxes.append(np.array(box, np.float32) / size)
    return np.stack(images), np.stack(boxes)


def render_set(
    count: int,
    scene_seed: int,
    hazard_rate: float,
    size: int,
    world_name: str,
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Each scene is rendered from its own seed, so the set is the same whatever the number of
    worker processes (a GPU machine's 16 cores render 80,000 scenes in seconds)."""
    from concurrent.futures import ProcessPoolExecutor

    scenes = sample_scenes(count, scene_seed, hazard_rate, world_name)
    chunks = [scenes[i : i + 1000] for i in range(0, len(scenes), 1000)]
    workers = min(len(chunks), workers or os.cpu_count() or 1)
    bar = tqdm(total=len(scenes), desc="render", leave=False)
    parts = []
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_render_chunk, chunks, repeat(size), repeat(world_name)):
            parts.append(part)
            bar.update(len(part[0]))
    bar.close()
    return {
        "images": np.concatenate([images for images, _ in parts]),
        "boxes": np.concatenate([boxes for _, boxes in parts]),
        **scene_table(scenes, world_name),
    }


def training_pool(subject: np.ndarray, shapes: int | None) -> torch.Tensor:
    """Indices of the scenes the generator trains on: all of them, or (``generator.subjects``)
    the scenes of the world's first ``shapes`` shapes alone, so that a probe can learn whether
    a layout's sublayers carry a few objects before a build pays for all of them."""
    if shapes is None:
        return torch.arange(len(subject))
    return torch.from_numpy(np.flatnonzero(subject < shapes))


def captions_for(
    table: dict[str, np.ndarray],
    index: np.ndarray,
    templates: list[str],
    rng: torch.Generator,
    classes: dict[str, list[str]],
) -> tuple[list[str], list[dict[str, int]]]:
    """A random template per image; also which attributes each caption states (for matching)."""
    picks = torch.randint(len(templates), (len(index),), generator=rng).tolist()
    captions, stated = [], []
    for i, t in zip(index.tolist(), picks, strict=True):
        values = {k: int(table[k][i]) for k in classes}
        template = templates[t]
        fields = {
            "shape": classes["subject"][values["subject"]],
            "style": classes["style"][values["style"]],
            "colour": classes["colour"][values["colour"]],
            "place": classes["place"][values["place"]],
        }
        captions.append(template.format(**fields))
        keys = {"shape": "subject", "style": "style", "colour": "colour", "place": "place"}
        stated.append({keys[k]: values[keys[k]] for k in keys if "{" + k + "}" in template})
    return captions, stated


def augment(
    pixels: torch.Tensor,
    recon: torch.Tensor,
    idx: torch.Tensor,
    a: dict[str, Any],
    g: torch.Generator,
) -> torch.Tensor:
    """Judges must survive generation artefacts: swap in VAE reconstructions (which exist for
    the first ``len(recon)`` images), blur, add noise and shift colours (all in [-1, 1])."""
    n = len(idx)
    use_recon = (torch.rand(n, generator=g) < a["reconstruction_prob"]) & (idx < len(recon))
    x = torch.where(use_recon.view(n, 1, 1, 1), recon[idx.clamp(max=len(recon) - 1)], pixels[idx])
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(n, generator=g) < a["blur_prob"]).view(n, 1, 1, 1)
    x = torch.where(use_blur, 0.5 * x + 0.5 * blur, x)
    gain = 1 + a["jitter"] * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    shift = a["jitter"] * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    sigma = a["noise_std"] * torch.rand(n, 1, 1, 1, generator=g)
    x = x * gain + shift + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)
