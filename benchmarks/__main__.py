"""``make bench``: generation throughput of our engine against the naive per-prompt diffusers
loop, measured in the same run, plus one of:

* ``--scale tiny`` (default): a whole harness job on a cold cache against the same job re-run
  on a warm cache, on the tiny world (CPU-sized);
* ``--scale mini``: the same on the shipped mini world, for the default command
  ``python -m fia_bench method=fia task=objects seeds=5`` (budget: 10 minutes on a 2-core CPU),
  plus ``preset=smoke`` on a cold cache (budget: one minute);
* ``--scale sd``: the SD v1.4 architecture with random weights (weights do not change speed),
  the methods' edit times through their plugins, those figures beside the targets and the
  papers' own, and the projected GPU-hours to reproduce FIA Tables 1 and 3 (``projection.py``).
* ``--scale mini-train``: the mini world's training recipe timed per stage on this device and
  the whole ``make mini-world`` build projected from it (``miniworld_train.py``; budget: 20
  minutes on one H100).

    python -m benchmarks                                    # tiny, CPU
    python -m benchmarks --scale mini                       # the default command, CPU
    python -m benchmarks --scale sd --device cuda [--compile]
    python -m benchmarks --scale sd --sd-steps 2 --sd-resolution 128 --images 2 ...   # CPU smoke
    python -m benchmarks --scale mini-train --device cuda --stage-steps 200

Results go to ``<out>/bench_<device>`` (tiny) or ``<out>/bench_<scale>_<device>`` (``mini``,
``sd``, ``mini_train``), ``.json`` and ``.md``; ``fia_bench.plan`` reads the engine rate of
``bench_sd_cuda.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import torch
import yaml

import fia_bench
from benchmarks import erasure, generation, miniworld_train, projection
from fia_bench.cache import write_json, write_text
from fia_bench.engine import AUTO, EngineOptions
from fia_bench.errors import FiaBenchError
from fia_bench.models import random_pipeline, torch_dtype
from fia_bench.report import markdown_table
from fia_bench.tasks import world_vocabulary

PROTOCOL = {"resolution": 512, "steps": 50}  # the paper protocol the targets are stated at
HARNESS_JOB = ["model=tiny_random", "method=uce", "seeds=2", "n_concepts=[1,3]"]
# the mini world's default command (issue budget: 10 minutes on the 2-core CPU) and its smoke run
DEFAULT_JOB = ["method=fia", "task=objects", "seeds=5"]
SMOKE_JOB = ["method=fia", "task=objects", "preset=smoke"]
BUDGET_S = {"default": 600.0, "smoke": 60.0}


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=("tiny", "mini", "sd", "mini-train"), default="tiny")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--images", type=int, help="images the engine makes (tiny, mini 32; sd 64)")
    p.add_argument("--batch-size", default=None, help="engine micro-batch: auto or N (tiny 16)")
    p.add_argument("--steps", type=int, default=10, help="tiny: DDIM steps")
    p.add_argument(
        "--job", action="append", default=[], help="tiny: an override for the harness job"
    )
    p.add_argument(
        "--stage-steps",
        type=int,
        default=50,
        help="mini-train: each trained stage runs twice this many steps and is timed over its last "
        "this many",
    )
    p.add_argument("--sd-steps", type=int, default=PROTOCOL["steps"], help="sd: DDIM steps")
    p.add_argument("--sd-resolution", type=int, default=PROTOCOL["resolution"])
    p.add_argument("--naive-images", type=int, default=8, help="sd: images of the naive loop")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="sd engine and methods")
    p.add_argument(
        "--compile",
        action="store_true",
        help="sd: torch.compile the engine's UNet; mini-train: the generator's (make mini-world's)",
    )
    p.add_argument("--train-steps", type=int, default=100, help="sd: ESD/Dynamic Mask steps timed")
    p.add_argument("--concepts", default="10,50", help="sd: the two UCE/ScaPre concept counts")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="sd: a method setting over its conf/method default (repeatable)",
    )
    return p.parse_args(argv)


def batch_option(value: str | None, default: str) -> int | None:
    text = value or default
    if text == AUTO:
        return None
    if not text.isdigit() or int(text) < 1:
        raise FiaBenchError(f"--batch-size must be '{AUTO}' or a positive integer, got {text!r}")
    return int(text)


def concept_counts(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) or len(set(parts)) < 2:
        raise FiaBenchError(f"--concepts takes two different counts such as 10,50, got {text!r}")
    return int(parts[0]), int(parts[1])


def method_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, setting = key.partition(".")
        if not (sep and dot and method and setting):
            raise FiaBenchError(f"--set takes METHOD.KEY=VALUE, got {item!r}")
        out.setdefault(method, {})[setting] = yaml.safe_load(value)
    return out


def machine(device: str, command: str) -> dict[str, Any]:
    """Where the figures were taken: they mean nothing without it."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
        if line.startswith("model name")
    ]
    on_cuda = torch.device(device).type == "cuda"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "cpu": models[0] if models else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "command": command,
    }


def header(m: dict[str, Any], title: str) -> list[str]:
    where = m["device_name"] if m["device"] != "cpu" else f"CPU ({m['cpu']})"
    return [
        f"# {title}",
        "",
        f"Ran on {where}: {m['cpu_count']} cores, torch threads {m['torch_threads']} at nice "
        f"{m['niceness']}, load average {m['load_average_at_start'][0]} at start; "
        f"torch {m['torch']}, diffusers "
        f"{m['diffusers']}, {m['date_utc']} UTC. Command: `{m['command']}`.",
        "",
    ]


def num(x: float) -> str:
    """Three significant digits, without an exponent for large values."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def generation_table(gen: dict[str, Any]) -> str:
    engine = (
        f"fia_bench engine ({gen['precision']}, batch {gen['batch_size']}, batched CFG"
        + (", channels_last" if gen["channels_last"] else "")
        + (", compiled" if gen["compile"] else "")
        + ")"
    )
    rows = [
        [
            "naive diffusers loop (fp32, 1 prompt per call)",
            f"{gen['naive_images_per_s']:.3g}",
            "1.00",
        ],
        [
            f"diffusers, one batched call ({gen['precision']}, batch {gen['batched_batch_size']})",
            f"{gen['batched_images_per_s']:.3g}",
            f"{gen['batched_speedup']:.2f}",
        ],
        [engine, f"{gen['engine_images_per_s']:.3g}", f"{gen['speedup']:.2f}"],
    ]
    return (
        markdown_table(["generation", "images/s", "× naive"], rows)
        + f"\n\nOne image costs {gen['flops_per_image'] / 1e9:.3g} GFLOP (torch's FLOP counter "
        "over a whole generation); a large matrix product runs at "
        f"{gen['gemm_peak_flops'] / 1e9:.3g} GFLOP/s here, so the engine uses "
        f"{100 * gen['engine_share_of_peak']:.1f}% of that peak."
    )


def guidance_table(guided: dict[str, dict[str, float]]) -> str:
    """The inference-time methods' cost: generation time against the unguided engine's."""
    rows = [[name, f"{r['seconds']:.3g}", f"{r['ratio']:.2f}"] for name, r in guided.items()]
    images = guided["unguided"]["images"]
    return (
        markdown_table([f"guidance ({images} images)", "seconds", "× unguided"], rows)
        + "\n\nSLD and SAFREE edit no weights; their cost is this overhead on every image they "
        "make (shipped settings, the first object as concept; the runs alternate)."
    )


# ---- tiny ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def private_cache() -> Iterator[Path]:
    before = os.environ.get("FIA_BENCH_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FIA_BENCH_CACHE"] = str(Path(tmp) / "cache")
        try:
            yield Path(tmp)
        finally:
            if before is None:
                del os.environ["FIA_BENCH_CACHE"]
            else:
                os.environ["FIA_BENCH_CACHE"] = before


def harness(overrides: list[str], warm: bool = True) -> dict[str, Any]:
    """The job on a cold cache, then (``warm``) again on the warm one, which generates nothing."""
    with private_cache() as tmp:
        start = time.perf_counter()
        fia_bench.run(overrides, out_dir=str(tmp / "cold"))
        result: dict[str, Any] = {"overrides": overrides, "cold_s": time.perf_counter() - start}
        if warm:
            start = time.perf_counter()
            fia_bench.run(overrides, out_dir=str(tmp / "warm"))
            result["warm_s"] = time.perf_counter() - start
            result["speedup"] = result["cold_s"] / result["warm_s"]
    return result


def job_line(title: str, job: dict[str, Any]) -> str:
    line = f"{title} `{' '.join(job['overrides'])}`: cold cache {job['cold_s']:.1f} s"
    if "warm_s" in job:
        line += (
            f", warm cache {job['warm_s']:.1f} s ({job['speedup']:.1f}× faster; the warm run "
            "generates nothing)"
        )
    return line + "."


def small_world(args: argparse.Namespace, world: str) -> tuple[dict[str, Any], str]:
    """The CPU-sized worlds: the engine against the naive loop, then whole harness jobs."""
    if world == "tiny":
        pipe, resolution, steps = (
            random_pipeline("tiny", world_vocabulary("tiny"), resolution=16, seed=0),
            16,
            args.steps,
        )
    else:
        from fia_bench.models import load_model

        cfg = fia_bench.compose(["model=mini"])
        pipe = load_model(cfg.model, world_vocabulary("mini"), "cpu", "fp32").pipe
        resolution, steps = int(cfg.model.resolution), int(cfg.sampler.steps)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    batch = batch_option(args.batch_size, "16")
    images = args.images or 32
    gen, engine = generation.compare(
        pipe,
        world,
        naive_images=images,
        images=images,
        steps=steps,
        resolution=resolution,
        precision="fp32",
        dtype=torch.float32,
        options=EngineOptions(batch_size=batch),
        sampler_batch=batch or 16,
    )
    guided = generation.guidance_overhead(engine, world, images)
    device = [f"device={args.device}"]
    if world == "tiny":
        jobs = {"harness": harness([*HARNESS_JOB, *device, *args.job])}
        lines = [job_line("Harness job", jobs["harness"])]
    else:
        jobs = {
            "default": harness([*DEFAULT_JOB, *device, *args.job]),
            "smoke": harness([*SMOKE_JOB, *device, *args.job], warm=False),
        }
        lines = [
            f"{job_line(title, jobs[name])} Budget on the 2-core CPU: {BUDGET_S[name]:.0f} s "
            f"({'met' if jobs[name]['cold_s'] <= BUDGET_S[name] else 'missed'})."
            for name, title in (("default", "Default command"), ("smoke", "Smoke preset"))
        ]
    m = machine(args.device, args.command)
    text = "\n".join(
        [
            *header(m, f"fia_bench benchmark, {world} world ({args.device})"),
            f"{world.capitalize()} world, {images} images at {resolution}×{resolution}, "
            f"{gen['steps']} DDIM steps, CFG 7.5.",
            "",
            generation_table(gen),
            "",
            guidance_table(guided),
            "",
            *(f"{line}\n" for line in lines),
        ]
    )
    return {"scale": world, "machine": m, "generation": gen, "guidance": guided, **jobs}, text


# ---- sd ------------------------------------------------------------------------------------------
def targets(
    protocol: dict[str, Any], gen: dict[str, Any], timing: dict[str, Any], comparable: bool
) -> list[dict[str, Any]]:
    ours = {
        "engine_images_per_s": gen["engine_images_per_s"],
        "engine_speedup": gen["speedup"],
        "fia_s_per_concept": timing["fia_s_per_concept"],
        "uce_s_50_concepts": timing["uce_s"].get("50"),
        "scapre_s_50_concepts": timing["scapre_s"].get("50"),
        "esd_s_1000_steps": timing["esd_s_per_step"] * 1000,
    }
    rows = []
    for name, target in protocol["targets"].items():
        value = ours[name]
        bound = target.get("at_least", target.get("at_most"))
        if value is None:
            status = "not measured"
        elif not comparable:
            status = "n/a: not the protocol settings on CUDA"
        else:
            met = value >= bound if "at_least" in target else value <= bound
            status = "met" if met else "missed"
        sign = "≥" if "at_least" in target else "≤"
        rows.append(
            {
                "measure": name,
                "ours": value,
                "target": f"{sign} {bound:g}",
                "status": status,
                "reference": target["reference"],
            }
        )
    return rows


def sd(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    on_cuda = torch.device(args.device).type == "cuda"
    precision = args.precision or ("bf16" if on_cuda else "fp32")
    counts = concept_counts(args.concepts)
    overrides = method_overrides(args.set)
    erasure.check_methods(overrides)
    protocol = projection.load_protocol()
    m = machine(args.device, args.command)
    log(f"building the SD v1 architecture at {args.sd_resolution}px on {args.device}")
    pipe = random_pipeline("sd_v1", world_vocabulary("sd"), resolution=args.sd_resolution, seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.requires_grad_(False).eval()
    batch = batch_option(args.batch_size, AUTO)
    gen, engine = generation.compare(
        pipe,
        "sd",
        naive_images=args.naive_images,
        images=args.images or 64,
        steps=args.sd_steps,
        resolution=args.sd_resolution,
        precision=precision,
        dtype=torch_dtype(precision),
        options=EngineOptions(batch_size=batch, channels_last=on_cuda, compile=args.compile),
        sampler_batch=batch or 32,
    )
    log(f"naive {gen['naive_images_per_s']:.3g} img/s, engine {gen['engine_images_per_s']:.3g}")
    partial = result_stem(args).with_suffix(".partial.json")

    def keep(methods: dict[str, Any]) -> None:
        write_json(partial, {"scale": "sd", "machine": m, "generation": gen, "methods": methods})

    keep({})
    timing = erasure.time_methods(engine, args.train_steps, counts, overrides, log, keep)
    lengths = projection.training_lengths()
    rates = {"naive": gen["naive_images_per_s"], "engine": gen["engine_images_per_s"]}
    rows = projection.project(protocol, rates, timing, lengths)
    comparable = (
        on_cuda
        and not overrides
        and (args.sd_resolution, args.sd_steps) == (PROTOCOL["resolution"], PROTOCOL["steps"])
    )
    checks = targets(protocol, gen, timing, comparable)
    result = {
        "scale": "sd",
        "machine": m,
        "protocol_settings": comparable,
        "generation": gen,
        "methods": timing,
        "targets": checks,
        "projection": {"lengths": lengths, "rows": rows},
    }
    return result, sd_markdown(result, protocol)


def sd_markdown(result: dict[str, Any], protocol: dict[str, Any]) -> str:
    gen, timing, m = result["generation"], result["methods"], result["machine"]
    steps = timing["train_steps"]
    settings = (
        f"SD v1.4 architecture, random weights, {gen['resolution']}×{gen['resolution']}, "
        f"{gen['steps']} DDIM steps, CFG {gen['guidance_scale']:g}; images timed: naive loop "
        f"{gen['naive_images']}, engine {gen['images']}."
    )
    caveat = (
        []
        if result["protocol_settings"]
        else [
            "**Not the paper protocol** (CPU, or resolution / steps / method settings "
            "shrunk): these figures check that the benchmark runs; they say nothing about GPU "
            "speed, and the targets are not judged. The projection below applies them to "
            "the protocol's image counts as they are.",
            "",
        ]
    )
    method_rows = [
        ["FIA, one concept", f"{num(timing['fia_s_per_concept'])} s"],
        *[
            [f"{name}, {n} concepts", f"{num(seconds)} s"]
            for key, name in (("uce_s", "UCE"), ("scapre_s", "ScaPre"))
            for n, seconds in timing[key].items()
        ],
        [
            f"ESD ({timing['esd_train_set']}), per 100 steps",
            f"{num(timing['esd_s_per_step'] * 100)} s",
        ],
        ["ESD, 1000 steps (projected)", f"{num(timing['esd_s_per_step'] * 1000)} s"],
        ["Dynamic Mask, per 100 steps", f"{num(timing['dynamic_mask_s_per_step'] * 100)} s"],
    ]
    target_rows = [
        [
            t["measure"],
            num(t["ours"]) if t["ours"] is not None else "–",
            t["target"],
            t["status"],
            t["reference"],
        ]
        for t in result["targets"]
    ]
    lengths = result["projection"]["lengths"]
    proj_rows = [
        [
            r["table"],
            r["regime"],
            f"{r['images']:,}",
            num(r["generate_h"]),
            num(r["erase_h"]),
            num(r["total_h"]),
        ]
        for r in result["projection"]["rows"]
    ]
    overrides = timing["overrides"]
    return "\n".join(
        [
            *header(m, f"fia_bench benchmark, SD v1 scale ({m['device']})"),
            settings,
            "",
            *caveat,
            generation_table(gen),
            "",
            f"Warm-up (not timed): naive {gen['naive_warmup_s']:.1f} s, engine "
            f"{gen['engine_warmup_s']:.1f} s"
            + (" (includes compilation)." if gen["compile"] else "."),
            "",
            "## Method edit times",
            "",
            "Through the plugins' API with their shipped settings"
            + (f", overridden: `{overrides}`" if overrides else "")
            + f"; ESD and Dynamic Mask timed over {steps} steps, Dynamic Mask's training images "
            f"({timing['dynamic_mask_training_images_s']:.1f} s) excluded.",
            "",
            markdown_table(["edit", "seconds"], method_rows),
            "",
            markdown_table(
                ["measure", "ours", "target (H100)", "status", "published"], target_rows
            ),
            "",
            "## Projected GPU-hours, FIA Tables 1 and 3",
            "",
            f"{len(protocol['methods'])} methods ({', '.join(protocol['methods'])}) × "
            f"{protocol['seeds']} seeds, from the rates and edit times above "
            "(benchmarks/protocol.yaml, benchmarks/projection.py). Images per model: "
            + "; ".join(
                f"{t['title']}: {projection.images_per_model(t['images']):,}"
                for t in protocol["tables"].values()
            )
            + f". Paper-scale training: ESD {lengths['esd_iterations']} iterations, Dynamic Mask "
            f"{lengths['dynamic_mask_steps_per_concept']} steps and "
            f"{lengths['dynamic_mask_images_per_concept']} training images per concept. "
            "Without the cache every job also regenerates the reference's images; with it a "
            "re-run of the same command costs nothing.",
            "",
            markdown_table(
                ["table", "regime", "images", "generate h", "erase h", "total h"], proj_rows
            ),
            "",
        ]
    )


# ---- mini-train ----------------------------------------------------------------------------------
def mini_train(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    m = machine(args.device, args.command)
    log(f"timing the mini world's recipe, {args.stage_steps} and {2 * args.stage_steps} steps")
    timing = miniworld_train.time_recipe(args.stage_steps, args.device, compile_unet=args.compile)
    on_cuda = torch.device(args.device).type == "cuda"
    text = "\n".join(
        [
            *header(m, f"fia_bench benchmark, mini-world training ({args.device})"),
            *miniworld_train.markdown(timing, on_cuda),
        ]
    )
    return {"scale": "mini-train", "machine": m, **timing}, text


def result_stem(args: argparse.Namespace) -> Path:
    """``<out>/bench_<device>`` (tiny) or ``<out>/bench_<scale>_<device>``."""
    kind = torch.device(args.device).type
    prefix = "bench" if args.scale == "tiny" else f"bench_{args.scale.replace('-', '_')}"
    return args.out / f"{prefix}_{kind}"


def log(line: str) -> None:
    print(f"[bench] {line}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = " ".join(["python -m benchmarks", *argv])
    try:
        if args.scale == "sd":
            result, text = sd(args)
        elif args.scale == "mini-train":
            result, text = mini_train(args)
        else:
            result, text = small_world(args, args.scale)
    except FiaBenchError as err:
        raise SystemExit(f"error: {err}") from None
    stem = result_stem(args)
    write_json(stem.with_suffix(".json"), result)
    write_text(stem.with_suffix(".md"), text)
    stem.with_suffix(".partial.json").unlink(missing_ok=True)  # the whole result replaces it
    print(text)


if __name__ == "__main__":
    main()
