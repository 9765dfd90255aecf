"""``make bench``: generation throughput of our engine against the naive per-prompt diffusers loop,
and a whole harness job with a cold cache against the same job re-run on a warm cache.

    python -m benchmarks [--images 32] [--steps 10] [--out benchmarks/results]

Defaults are CPU-sized on the tiny world; results go to ``<out>/bench_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import fia_bench
from fia_bench.cache import write_json, write_text
from fia_bench.engine import Engine, Sampler
from fia_bench.models import random_pipeline
from fia_bench.report import markdown_table
from fia_bench.tasks import load_task, world_vocabulary


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generation(images: int, steps: int, batch_size: int, device: str) -> dict[str, float]:
    pipe = random_pipeline("tiny", world_vocabulary("tiny"), resolution=16, seed=0).to(device)
    pipe.set_progress_bar_config(disable=True)
    task = load_task("objects", "tiny")
    prompts = [f"a photo of a {task.concepts[i % len(task.concepts)]}" for i in range(images)]
    seeds = list(range(images))

    def naive() -> None:
        for prompt, seed in zip(prompts, seeds, strict=True):
            pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=7.5,
                height=16,
                width=16,
                generator=torch.Generator("cpu").manual_seed(seed),
            )

    engine = Engine(pipe, Sampler("ddim", steps, 7.5, 0.0, batch_size), 16, device, torch.float32)

    def batched() -> None:
        for start in range(0, images, batch_size):
            engine.generate(prompts[start : start + batch_size], seeds[start : start + batch_size])

    naive()  # warm-up of both paths before timing
    batched()
    naive_s, engine_s = timed(naive), timed(batched)
    return {
        "images": images,
        "steps": steps,
        "batch_size": batch_size,
        "naive_images_per_s": images / naive_s,
        "engine_images_per_s": images / engine_s,
        "speedup": naive_s / engine_s,
    }


def harness(overrides: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FIA_BENCH_CACHE"] = str(Path(tmp) / "cache")
        cold = timed(lambda: fia_bench.run(overrides, out_dir=str(Path(tmp) / "cold")))
        warm = timed(lambda: fia_bench.run(overrides, out_dir=str(Path(tmp) / "warm")))
    return {"cold_s": cold, "warm_s": warm, "speedup": cold / warm}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    gen = generation(args.images, args.steps, args.batch_size, args.device)
    job = ["method=uce", "seeds=2", "n_concepts=[1,3]", f"device={args.device}"]
    run = harness(job)
    result = {
        "device": args.device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "generation": gen,
        "harness": {"overrides": job, **run},
    }
    stem = args.out / f"bench_{args.device}"
    write_json(stem.with_suffix(".json"), result)
    rows = [
        [
            "naive diffusers loop (fp32, 1 prompt per call)",
            f"{gen['naive_images_per_s']:.1f}",
            "1.00",
        ],
        [
            "fia_bench engine (batched CFG)",
            f"{gen['engine_images_per_s']:.1f}",
            f"{gen['speedup']:.2f}",
        ],
    ]
    text = "\n".join(
        [
            f"# fia_bench benchmark ({args.device}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__})",
            "",
            f"Tiny world, {gen['images']} images, {gen['steps']} DDIM steps, CFG 7.5, "
            f"batch {gen['batch_size']}.",
            "",
            markdown_table(["generation", "images/s", "× naive"], rows),
            "",
            f"Harness job `{' '.join(job)}`: cold cache {run['cold_s']:.1f} s, warm cache "
            f"{run['warm_s']:.1f} s ({run['speedup']:.1f}× faster; the warm run generates "
            "nothing).",
            "",
        ]
    )
    write_text(stem.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
