"""Images/s of the naive per-prompt diffusers loop, of one batched diffusers call and of our
engine, on one pipeline in one run, and the engine's share of the machine's GEMM peak.

The naive loop is what the reference repositories' evaluation scripts do: one
``StableDiffusionPipeline.__call__`` per prompt in fp32. The batched call is the best a user gets
from diffusers alone: ``pipe(prompt=[...], generator=[...])`` at the engine's batch size, in the
engine's dtype. The engine then runs on the same weights with its options. Each is warmed up
first (kernel selection, allocator, compilation), and the warm-up time is reported apart. The
share of peak is the engine's rate times the FLOPs of one image (``torch.utils.flop_counter`` over
a whole generation: text encoder, every UNet step with its guidance half, VAE decoder) over the
rate of a large matrix product timed on the same device.
"""

from __future__ import annotations

from typing import Any

import torch

import fia_bench
from benchmarks.erasure import synchronized_time
from fia_bench.engine import Engine, EngineOptions, Sampler
from fia_bench.registry import METHODS
from fia_bench.tasks import load_task
from fia_bench.validate import plain

INFERENCE_TIME_METHODS = ("sld", "safree")  # methods whose cost is the guidance's, per image

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


def batched_images_per_s(
    pipe: Any, world: str, images: int, steps: int, resolution: int, batch: int
) -> dict[str, float | int]:
    prompts, seeds = prompts_and_seeds(world, images)
    device = pipe.unet.device

    def call(rows: range, n_steps: int) -> None:
        for start in range(rows.start, rows.stop, batch):
            part = slice(start, min(start + batch, rows.stop))
            pipe(
                prompt=prompts[part],
                num_inference_steps=n_steps,
                guidance_scale=GUIDANCE,
                height=resolution,
                width=resolution,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[part]],
            )

    start = synchronized_time(device)
    call(range(min(batch, images)), min(steps, 2))
    warm = synchronized_time(device)
    call(range(images), steps)
    return {
        "batched_images_per_s": images / (synchronized_time(device) - warm),
        "batched_batch_size": min(batch, images),
        "batched_warmup_s": warm - start,
    }


def flops_per_image(engine: Engine, world: str) -> float:
    """FLOPs of one whole generation, counted by torch over the engine's own call."""
    from torch.utils.flop_counter import FlopCounterMode

    prompts, seeds = prompts_and_seeds(world, 1)
    engine.forget_embeddings()  # the text encoder's share too, not a memoised embedding
    with FlopCounterMode(display=False) as counter:
        engine.generate(prompts, seeds)
    return float(counter.get_total_flops())


def gemm_peak_flops(device: str, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a square matrix product of ``size``: the practical peak of this device."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    start = synchronized_time(torch.device(device))
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (synchronized_time(torch.device(device)) - start)


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


def guidance_overhead(
    engine: Engine, world: str, images: int, rounds: int = 2
) -> dict[str, dict[str, float]]:
    """Seconds to make ``images`` with each inference-time method's guidance at its shipped
    settings (the first object erased) and without, and each one's ratio to the unguided time.
    After one warm-up batch of each, the runs alternate for ``rounds`` rounds, so a drifting
    machine load weighs on all of them alike."""
    prompts, seeds = prompts_and_seeds(world, images)
    task = load_task("objects", world)
    runs: dict[str, Any] = {"unguided": None}
    for name in INFERENCE_TIME_METHODS:
        settings = plain(fia_bench.compose([f"method={name}"]).method.settings)
        runs[name] = METHODS.get(name)(**settings).sampling_guidance(task.concepts[:1], task)
    size = engine.batch_size
    for guidance in runs.values():
        engine.generate(prompts[:size], seeds[:size], guidance=guidance)
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, guidance in runs.items():
            start = synchronized_time(engine.device)
            engine.generate(prompts, seeds, guidance=guidance)
            seconds[name] += synchronized_time(engine.device) - start
    return {
        name: {"images": images, "seconds": s / rounds, "ratio": s / seconds["unguided"]}
        for name, s in seconds.items()
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
    batched = batched_images_per_s(
        pipe, world, images, steps, resolution, min(engine.batch_size, images)
    )
    measured = engine_images_per_s(engine, world, images)
    flops = flops_per_image(engine, world)
    peak = gemm_peak_flops(device, dtype, 4096 if device.startswith("cuda") else 1024)
    return (
        naive
        | batched
        | measured
        | {
            "flops_per_image": flops,
            "gemm_peak_flops": peak,
            "engine_share_of_peak": measured["engine_images_per_s"] * flops / peak,
            "batched_speedup": batched["batched_images_per_s"] / naive["naive_images_per_s"],
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
