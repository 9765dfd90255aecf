"""Images/s of the naive per-prompt diffusers loop and of our engine, on one pipeline in one run.

The naive loop is what the reference repositories' evaluation scripts do: one
``StableDiffusionPipeline.__call__`` per prompt in fp32. The engine then runs on the same
weights, cast to its precision, with its options. Both are warmed up first (kernel selection,
allocator, compilation), and the warm-up time is reported apart.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.erasure import synchronized_time
from fia_bench.engine import Engine, EngineOptions, Sampler
from fia_bench.tasks import load_task

GUIDANCE = 7.5


def prompts_and_seeds(world: str, images: int) -> tuple[list[str], list[int]]:
    concepts = load_task("objects", world).concepts
    return [f"a photo of a {concepts[i % len(concepts)]}" for i in range(images)], list(
        range(images)
    )


def naive_images_per_s(
    pipe: Any, world: str, images: int, steps: int, resolution: int
) -> dict[str, float]:
    prompts, seeds = prompts_and_seeds(world, images)
    device = pipe.unet.device

    def loop(rows: int, n_steps: int) -> None:
        for prompt, seed in zip(prompts[:rows], seeds[:rows], strict=True):
            pipe(
                prompt,
                num_inference_steps=n_steps,
                guidance_scale=GUIDANCE,
                height=resolution,
                width=resolution,
                generator=torch.Generator("cpu").manual_seed(seed),
            )

    start = synchronized_time(device)
    loop(1, min(steps, 2))
    warm = synchronized_time(device)
    loop(images, steps)
    return {
        "naive_images": images,
        "naive_images_per_s": images / (synchronized_time(device) - warm),
        "naive_warmup_s": warm - start,
    }


def engine_images_per_s(engine: Engine, world: str, images: int) -> dict[str, float | int]:
    """Warm-up on one full micro-batch and on the last one's size (a compiled UNet specialises
    on batch shape), then time ``images`` in one ``generate`` call."""
    prompts, seeds = prompts_and_seeds(world, images)
    start = synchronized_time(engine.device)
    engine.generate(prompts[: engine.batch_size], seeds[: engine.batch_size])
    tail = images % engine.batch_size if images > engine.batch_size else 0
    if tail:
        engine.generate(prompts[:tail], seeds[:tail])
    warm = synchronized_time(engine.device)
    engine.generate(prompts, seeds)
    return {
        "images": images,
        "engine_images_per_s": images / (synchronized_time(engine.device) - warm),
        "engine_warmup_s": warm - start,
        "batch_size": min(engine.batch_size, images),  # the batch the rate was measured at
    }


def compare(
    pipe: Any,
    world: str,
    *,
    naive_images: int,
    images: int,
    steps: int,
    resolution: int,
    precision: str,
    dtype: torch.dtype,
    options: EngineOptions,
    sampler_batch: int,
) -> tuple[dict[str, Any], Engine]:
    """The ``generation`` record (the keys ``fia_bench.plan`` reads from a CUDA result among
    them) and the engine, left on the pipeline for the method timings."""
    naive = naive_images_per_s(pipe, world, naive_images, steps, resolution)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    device = str(pipe.unet.device)
    engine = Engine(
        pipe,
        Sampler("ddim", steps, GUIDANCE, 0.0, sampler_batch),
        resolution,
        device,
        dtype,
        options,
    )
    measured = engine_images_per_s(engine, world, images)
    return (
        naive
        | measured
        | {
            "steps": steps,
            "resolution": resolution,
            "guidance_scale": GUIDANCE,
            "precision": precision,
            "channels_last": options.channels_last,
            "compile": options.compile,
            "speedup": measured["engine_images_per_s"] / naive["naive_images_per_s"],
        },
        engine,
    )
