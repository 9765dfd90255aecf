"""Train variants of the recipe's generator side by side on one build's data, VAE and judges,
then measure each: object accuracy, the card's sublayer rows, inference cost, a grid of images.

How the recipe's UNet is chosen (issue 16): a variant changes only the generator (``unet``,
``text_encoder``, ``generator`` keys), so every variant learns from the same latents and is read
by the same judges, and the best one (meeting the card's targets first, then by base accuracy)
can be exported as it is. On a GPU the variants run as parallel processes (a small UNet leaves
the device idle between kernel launches). ``--minutes`` is the time they share: a variant whose
``steps`` is ``fit`` first times a burst of steps beside the others and then gets one cosine
cycle of as many steps as its pace allows, so every variant is compared at the same cost in
time and ends its schedule; a variant with fixed steps that does not finish is measured as it
stands (its EMA weights) and marked so."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fia_bench.errors import FiaBenchError
from fia_bench.miniworld.build_files import Ledger, load_tensors, recipe
from fia_bench.miniworld.loop import cycles_of
from fia_bench.miniworld.state import BuildState
from fia_bench.miniworld.train import Builder

GENERATOR_KEYS = ("unet", "text_encoder", "text", "generator")
UPSTREAM = ("data", "vae", "classifier", "clip")
# what a variant trains: the generator, after a text encoder of its own where its recipe has a
# ``text`` section (a stage that does nothing otherwise)
TRAINED_HERE = ("text", "generator")
SHARED = ("data.npz", "latents.safetensors", "recon.npz", "vae.safetensors", "export")
TRAIN = [sys.executable, "-m", "fia_bench.miniworld", "train"]
TIMING_STEPS = 40
FIT_SHARE = 0.9
START_MINUTES = 1.0


def variants_file() -> Path:
    return Path(__file__).with_name("variants.yaml")


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def variant_recipes(
    base: dict[str, Any], variants: dict[str, dict[str, Any]], source: Path
) -> dict[str, dict[str, Any]]:
    """Each variant's whole recipe. A variant may change the generator alone: the others share
    the base build's renders, VAE and judges."""
    out = {}
    for name, overrides in variants.items():
        other = sorted(set(overrides or {}) - set(GENERATOR_KEYS))
        if other:
            raise FiaBenchError(
                f"{source}: variant '{name}' changes {other}; a variant may change only "
                f"{list(GENERATOR_KEYS)} (the rest is shared with the base build)"
            )
        out[name] = merged(base, overrides or {})
    return out


def fits(r: dict[str, Any]) -> bool:
    """A variant whose generator ``steps`` is ``fit`` gets as many steps (one cosine cycle) as
    its measured pace allows in the probe's time budget."""
    return r["generator"]["steps"] == "fit"


def fitted_steps(pace: float, minutes: float) -> int:
    """Steps that end within ``minutes`` at ``pace`` seconds per step, with a margin for the
    saves (in hundreds, when there are that many)."""
    steps = int(FIT_SHARE * 60 * minutes / pace)
    return max(1, steps // 100 * 100 if steps >= 100 else steps)


def timed(
    base_build: Path, root: Path, recipes: dict[str, dict[str, Any]], device: str, threads: int
) -> dict[str, float]:
    """Seconds per generator step of the variants that fit their steps, measured in a burst of
    ``TIMING_STEPS`` with every variant running at once, as they will train (they share the
    device)."""
    trial = {}
    for name, r in recipes.items():
        r = copy.deepcopy(r)
        # timed with the encoder training beside the UNet: a frozen one's steps are no slower
        r.pop("text", None)
        if fits(r):
            r["generator"]["steps"] = [10 * TIMING_STEPS]
        trial[name] = prepare(base_build, root / "timing", name, r)
    limits = ["--stages", "generator", "--device", device, "--max-steps", str(TIMING_STEPS)]
    commands = {
        name: [*TRAIN, "--build", str(build), "--recipe", str(path), *limits]
        for name, (build, path) in trial.items()
    }
    failed = run_all(commands, root / "timing", threads)
    if failed:
        raise FiaBenchError(f"timing failed for {failed}: see {root}/timing/<variant>.log")
    paces = {
        name: Ledger(build).read("pace.json", {})["generator"]
        for name, (build, _) in trial.items()
        if fits(recipes[name])
    }
    shutil.rmtree(root / "timing")
    return paces


def prepare(base_build: Path, root: Path, name: str, r: dict[str, Any]) -> tuple[Path, Path]:
    """A build directory for one variant, linked to the base build's upstream files."""
    build = root / name
    build.mkdir(parents=True, exist_ok=True)
    for shared in SHARED:
        link = build / shared
        if not link.exists():
            link.symlink_to((base_build / shared).resolve())
    Ledger(build).write("done.json", list(UPSTREAM))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False), "utf-8")
    return build, path


def unet_mflops(builder: BuildState) -> float:
    """Inference cost: MFLOP of one guided UNet call (prompt and empty prompt) on one image."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = builder.current_pipeline()
    size = pipe.unet.config.sample_size
    hidden = pipe.text_encoder.config.hidden_size
    length = pipe.tokenizer.model_max_length
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.unet(torch.zeros(2, 4, size, size), 500, torch.zeros(2, length, hidden))
    return counter.get_total_flops() / 1e6


def grid(build: Path, recipe_path: Path, objects: int | None, device: str, out: Path) -> None:
    """One image of each task object ("a <object>", seed 0), in the world's order."""
    import fia_bench
    from fia_bench.datasets.procedural import contact_sheet, world
    from fia_bench.engine import Engine, Sampler
    from fia_bench.miniworld.card import TASK_OBJECTS

    builder = BuildState(build, recipe_path=recipe_path)
    cfg = fia_bench.compose(["model=mini"])
    engine = Engine(
        builder.current_pipeline().to(device),
        Sampler.from_config(cfg.sampler),
        int(cfg.model.resolution),
        device,
        torch.float32,
    )
    names = world(builder.world)["shapes"][: objects or TASK_OBJECTS]
    images = engine.generate([f"a {name}" for name in names], [0] * len(names))
    contact_sheet(images, columns=10).save(out)


def measure(
    name: str,
    build: Path,
    recipe_path: Path,
    images_per_prompt: int,
    objects: int | None,
    device: str,
    out: Path,
) -> dict[str, Any]:
    from fia_bench.miniworld.card import sublayers

    state = load_tensors(build / "generator.state.safetensors")[1]
    ledger = Ledger(build)
    training = ledger.training()
    row: dict[str, Any] = {
        "variant": name,
        "step": state["step"],
        "steps": sum(cycles_of(recipe(recipe_path)["generator"]["steps"])),
        "finished": "generator" in ledger.done(),
        "train_seconds": round(training["seconds"].get("generator", 0.0), 1),
        "devices": training["devices"].get("generator"),
        "unet_mflops": round(unet_mflops(BuildState(build, recipe_path=recipe_path)), 1),
    }
    row |= sublayers(build, images_per_prompt, objects, recipe_path, device)
    grid(build, recipe_path, objects, device, out / f"grid_{name}.png")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("variant", "variant"),
        ("step", "step"),
        ("finished", "done"),
        ("train_seconds", "train s"),
        ("unet_mflops", "MFLOP/call"),
        ("meets_targets", "targets met"),
        ("ablation_base", "base %"),
        ("ablation_ff.net.2_zeroed", "FFN2 zeroed %"),
        ("ablation_attn2.to_v_zeroed", "attn2 V zeroed %"),
        ("ablation_ff.net.2_random5_cost_points", "FFN2 5% cost pts"),
    ]
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_all(commands: dict[str, list[str]], logs: Path, threads: int) -> list[str]:
    """One process per variant, all at once; the names of those that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running = []
    for name, command in commands.items():
        log = (logs / f"{name}.log").open("a")
        running.append((name, subprocess.Popen(command, env=env, stdout=log, stderr=log)))
    return [name for name, process in running if process.wait() != 0]


def meets_targets(row: dict[str, Any]) -> bool:
    """The card's sublayer targets, on a generator that draws its objects: zeroing a family
    of one that has not learnt them yet takes away nothing (a 10-shape variant at 26% fell to
    chance with FFN2 zeroed, as an untrained one would)."""
    from fia_bench.miniworld.card import (
        ABLATION_TARGETS,
        BASE_OBJECTS_TARGET,
        RANDOM_COST_TARGET,
    )

    if row["ablation_base"] < BASE_OBJECTS_TARGET:
        return False
    zeroed = all(row[f"ablation_{f}_zeroed"] <= t for f, t in ABLATION_TARGETS.items())
    return zeroed and row["ablation_ff.net.2_random5_cost_points"] <= RANDOM_COST_TARGET


def stacked_grids(rows: list[dict[str, Any]], grids: Path, out: Path) -> None:
    """Every variant's grid in one picture, a caption above each."""
    from PIL import Image, ImageDraw

    images = [Image.open(grids / f"grid_{row['variant']}.png") for row in rows]
    width, caption = max(g.width for g in images), 14
    sheet = Image.new("RGB", (width, sum(g.height + caption for g in images)), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for row, image in zip(rows, images, strict=True):
        draw.text((2, y + 1), f"{row['variant']} (step {row['step']})", fill="black")
        sheet.paste(image, (0, y + caption))
        y += image.height + caption
    sheet.save(out / "grids.png")


def collect(root: Path, out: Path) -> list[dict[str, Any]]:
    """The measured variants' rows in one table (probe.json, probe.md), their grids in one
    picture, and the best one's generator (EMA weights, ready to export): the variants that
    meet the card's targets first, then base accuracy. A few files, whatever was measured: a
    run stopped during the measurements still leaves the ones that finished."""
    rows = [json.loads(path.read_text("utf-8")) for path in sorted((root / "rows").glob("*.json"))]
    if not rows:
        raise FiaBenchError(f"{root}/rows: no variant has been measured yet")
    for row in rows:
        row["meets_targets"] = meets_targets(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(rows, indent=1) + "\n", "utf-8")
    (out / "probe.md").write_text(table(rows), "utf-8")
    stacked_grids(rows, root / "rows", out)
    best = max(rows, key=lambda row: (row["meets_targets"], row["ablation_base"]))
    final = root / best["variant"] / "generator.safetensors"
    if final.exists():
        shutil.copy(final, out / f"generator_{best['variant']}.safetensors")
    print(table(rows))
    print(f"[probe] best: {best['variant']}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fia_bench.miniworld.probe")
    parser.add_argument("--build", type=Path, default=Path(".mini_world_build"))
    parser.add_argument("--recipe", type=Path, default=None, help="the base recipe.yaml")
    parser.add_argument("--variants", type=Path, default=variants_file())
    parser.add_argument("--only", nargs="+", default=None, help="these variants alone")
    parser.add_argument("--root", type=Path, default=Path(".mini_world_probe"))
    parser.add_argument("--out", type=Path, default=Path(".mini_world_probe/results"))
    # per variant: <root>/<variant>/ (its build), <variant>.yaml, <variant>.log, rows/<variant>.*
    parser.add_argument("--minutes", type=float, default=float("inf"), help="per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--objects", type=int, default=None, help="measure the first N objects")
    parser.add_argument("--collect", action="store_true", help="only gather the measured rows")
    parser.add_argument("--measure-variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows_dir = args.root / "rows"
    if args.measure_variant:  # one of the parallel measurements main starts
        name = args.measure_variant
        row = measure(
            name,
            args.root / name,
            args.root / f"{name}.yaml",
            args.images_per_prompt,
            args.objects,
            args.device,
            rows_dir,
        )
        (rows_dir / f"{name}.json").write_text(json.dumps(row, indent=1) + "\n", "utf-8")
        return
    if args.collect:
        collect(args.root, args.out)
        return

    variants = yaml.safe_load(args.variants.read_text("utf-8")) or {}
    unknown = sorted(set(args.only or ()) - set(variants))
    if unknown:
        raise FiaBenchError(f"--only: no variants {unknown} in {args.variants}; {sorted(variants)}")
    chosen = {k: v for k, v in variants.items() if not args.only or k in args.only}
    recipes = variant_recipes(recipe(args.recipe), chosen, args.variants)
    started = time.monotonic()
    # the shared upstream; renders and latents are made again if the build came without them
    base = Builder(args.build, recipe_path=args.recipe, device=args.device)
    if not base.run(list(UPSTREAM)):
        raise FiaBenchError(f"{args.build}: the upstream stages {list(UPSTREAM)} did not finish")
    base.encode_renders()
    print(f"[probe] upstream ready after {time.monotonic() - started:.0f} s", flush=True)
    rows_dir.mkdir(parents=True, exist_ok=True)
    if any(fits(r) for r in recipes.values()):
        if args.minutes == float("inf"):
            raise FiaBenchError("variants with steps: fit need --minutes, the time they share")
        paces = timed(args.build, args.root, recipes, args.device, args.threads)
        for name, pace in paces.items():
            recipes[name]["generator"]["steps"] = [fitted_steps(pace, args.minutes)]
            print(f"[probe] {name}: {pace:.3f} s/step, {recipes[name]['generator']['steps']}")
    prepared = {name: prepare(args.build, args.root, name, r) for name, r in recipes.items()}
    # the fitted steps end within --minutes; the wall-clock cap adds a minute for each process's
    # start (imports, loading the latents, the device's warm-up), which the pace does not count
    cap = args.minutes + START_MINUTES
    limits = ["--stages", *TRAINED_HERE, "--device", args.device, "--max-minutes", str(cap)]
    train = {
        name: [*TRAIN, "--build", str(build), "--recipe", str(path), *limits]
        for name, (build, path) in prepared.items()
    }
    failed = run_all(train, args.root, args.threads)
    print(f"[probe] trained after {time.monotonic() - started:.0f} s", flush=True)
    common = ["--root", str(args.root), "--device", args.device]
    common += ["--images-per-prompt", str(args.images_per_prompt)]
    common += ["--objects", str(args.objects)] if args.objects else []
    module = [sys.executable, "-m", "fia_bench.miniworld.probe"]
    measure_all = {
        name: [*module, *common, "--measure-variant", name]
        for name in prepared
        if name not in failed
    }
    failed += run_all(measure_all, args.root, args.threads)
    print(f"[probe] measured after {time.monotonic() - started:.0f} s", flush=True)
    collect(args.root, args.out)
    if failed:
        raise FiaBenchError(f"variants {failed} failed: see {args.root}/<variant>.log")


if __name__ == "__main__":
    main()
