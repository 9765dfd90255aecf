"""Where one step of the mini world's generator stage spends its time on this device.

``--scale mini-train`` says how long a step takes; this says why. On an H200 (first run,
``results/generator_step_cuda.txt``) a step took 76 ms, the profiler counted 82 ms of host time
and about 2,200 kernel launches per step, and at most 11 ms of kernel time: a UNet this small is
bound by the host (Python dispatch and launches), so the lever is fewer launches (foreach
updates, captured graphs), not a faster GPU. Compiled (``--compile``, as the build's own
``--compile``), the step took 29.5 ms with 132 launches
(``results/generator_step_cuda_compiled.json``); that run's AdamW was not yet fused, as ``Loop``
now makes it on a GPU.
The step is the generator stage's own (the recipe's UNet at its batch size, a fixed text
encoder, and ``Loop.update``: gradient clipping, AdamW, the weight average) on random data:
drawing and tokenising a batch of captions took about 5 ms on one CPU thread.

    python -m benchmarks.generator_step --device cuda --steps 50 [--compile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fia_bench.miniworld.loop import Loop, compiled
from fia_bench.miniworld.nets import build_text_encoder, build_unet
from fia_bench.miniworld.state import BuildState

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")
PHASES = ("to_device", "forward", "backward", "clip", "adamw", "average", "loss_item")


def generator_step(
    device: str, recipe_path: Path | None, work: Path, compile_unet: bool = False
) -> tuple[Callable[[Callable[[str], None]], None], dict[str, Any]]:
    """One training step of the generator stage as a function of a phase marker; with
    ``compile_unet``, through the build's ``compiled`` (CUDA graphs on a GPU)."""
    builder = BuildState(work, recipe_path=recipe_path, device=device)
    r, tokenizer = builder.r, builder.tokenizer
    unet = build_unet(r).to(device)
    text_encoder = build_text_encoder(r, tokenizer).to(device).eval().requires_grad_(False)
    cfg = r["generator"]
    loop = Loop(builder.build, "generator", {"unet": unet}, cfg["lr"], cfg["steps"])
    batch = cfg["batch_size"]
    ids = tokenizer(
        ["a red circle in the park"] * batch,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    size = r["resolution"] // 2 ** (len(r["vae"]["block_out_channels"]) - 1)
    latents = torch.randn(batch, unet.config.in_channels, size, size)
    noise, t = torch.randn_like(latents), torch.randint(1000, (batch,))

    model = compiled(unet, torch.device(device)) if compile_unet else unet

    def step(mark: Callable[[str], None]) -> None:
        x, tt, e, i = latents.to(device), t.to(device), noise.to(device), ids.to(device)
        mark("to_device")
        pred = model(x, tt, encoder_hidden_states=text_encoder(i)[0]).sample
        loss = (pred - e).pow(2).mean()
        mark("forward")
        loop.update(loss, cfg["ema_decay"], mark)
        loss.item()
        mark("loss_item")

    return step, {"batch_size": batch, "unet_tensors": len(unet.state_dict())}


def measure(
    device: str, steps: int, recipe_path: Path | None, compile_unet: bool = False
) -> tuple[dict[str, Any], str]:
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the builder sets it

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as work:
        step, shape = generator_step(device, recipe_path, Path(work), compile_unet)
    for _ in range(10):  # kernels chosen, caches warm
        step(lambda _: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(lambda _: None)
    sync()
    free_running = (time.perf_counter() - start) / steps
    phases = dict.fromkeys(PHASES, 0.0)
    clock = [time.perf_counter()]

    def mark(phase: str) -> None:
        sync()
        now = time.perf_counter()
        phases[phase] += now - clock[0]
        clock[0] = now

    for _ in range(steps):
        clock[0] = time.perf_counter()
        step(mark)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(5):
            step(lambda _: None)
        sync()
    events = prof.key_averages()
    result = {
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "torch": torch.__version__,
        "steps": steps,
        "compiled": compile_unet,
        **shape,
        "step_ms": 1e3 * free_running,
        "phase_ms_synchronised": {k: round(1e3 * v / steps, 2) for k, v in phases.items()},
        "host_ms_per_step_profiled": sum(e.self_cpu_time_total for e in events) / 5e3,
        "kernel_launches_per_step": sum(e.count for e in events if e.key in LAUNCHES) / 5,
    }
    table = events.table(sort_by="self_cpu_time_total", row_limit=20)
    return result, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generator_step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--recipe", type=Path, default=None, help="another recipe.yaml")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    args = parser.parse_args(argv)
    result, table = measure(args.device, args.steps, args.recipe, args.compile)
    text = json.dumps(result, indent=1)
    print(text)
    print(table)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
