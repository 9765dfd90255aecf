"""Wall time of each method's edit at SD v1 scale, through the plugins' normal API.

Every method is built from its shipped settings (``conf/method/<name>.yaml``) with the
benchmark's overrides on top, and asked to erase through an ``EraseRequest`` on the benchmark's
engine, as a harness job would. Methods run one after another on the same random weights without
undoing the previous edit: values do not change how long a forward or a solve takes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.projection import method_settings
from fia_bench.api import EraseRequest
from fia_bench.engine import Engine
from fia_bench.errors import unknown_choice
from fia_bench.registry import METHODS
from fia_bench.tasks import load_task


def synchronized_time(device: torch.device) -> float:
    """A clock reading after every queued kernel has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def erase(
    name: str, engine: Engine, task: str, n_concepts: int, overrides: dict[str, Any]
) -> tuple[float, dict[str, Any], float]:
    """(seconds, the method's info, seconds of it spent making base-model training images):
    the first ``n_concepts`` of the SD world's ``task`` erased, the rest retained. Training
    images come from the engine, as the harness's image cache would make them the first time."""
    concepts = load_task(task, "sd")
    targets, retain = concepts.split(n_concepts)
    making = [0.0]

    def base_images(prompts: list[str], seeds: list[int], negative_prompts=None) -> list:
        start = synchronized_time(engine.device)
        images = engine.generate(prompts, seeds, negative_prompts)
        making[0] += synchronized_time(engine.device) - start
        return images

    method = METHODS.get(name)(**(method_settings(name) | overrides))
    request = EraseRequest(targets, retain, 0, concepts, engine, base_images)
    start = synchronized_time(engine.device)
    info = method.erase(request)
    return synchronized_time(engine.device) - start, info, making[0]


TIMED_METHODS = ("fia", "uce", "scapre", "esd", "dynamic_mask")


def check_methods(overrides: dict[str, dict[str, Any]]) -> None:
    """Every timed method found and every ``--set`` checked against its settings before any
    model is built: a missing plugin or a misspelt setting once surfaced only after minutes of
    generation timing on a GPU, which were then lost."""
    for name in TIMED_METHODS:
        METHODS.get(name)
    for name, settings in overrides.items():
        if name not in TIMED_METHODS:
            raise unknown_choice("timed method", name, TIMED_METHODS, "--set")
        METHODS.get(name).SETTINGS.check(settings, f"--set {name}")


def dynamic_mask_shape(steps: int) -> dict[str, int]:
    """Settings that make Dynamic Mask train exactly ``steps`` steps on one concept with its
    batch of 2: at most the shipped 100 images per class, and epochs for the rest."""
    per_epoch = min(steps, 50)
    return {
        "images_per_class": 2 * per_epoch,
        "epochs": math.ceil(steps / per_epoch),
        "warmup_steps": min(50, per_epoch // 2),
        "batch_size": 2,
    }


def time_methods(
    engine: Engine,
    train_steps: int,
    concept_counts: tuple[int, int],
    overrides: dict[str, dict[str, Any]],
    log: Callable[[str], None],
    keep: Callable[[dict[str, Any]], None] = lambda figures: None,
) -> dict[str, Any]:
    """FIA per concept, UCE and ScaPre for two concept counts (10 and 50 at paper scale), ESD
    and Dynamic Mask per step (timed over ``train_steps``). ``overrides`` maps a method to
    settings that replace its shipped ones (CPU-sized runs shrink FIA's saliency pass and ESD's
    sampler with them). ``keep`` is handed the figures so far after each method: a run cut short
    (a lent GPU's minutes running out) still leaves what it measured."""
    out: dict[str, Any] = {"train_steps": train_steps, "overrides": overrides}
    seconds, _, _ = erase("fia", engine, "objects", 1, overrides.get("fia", {}))
    out["fia_s_per_concept"] = seconds
    log(f"fia: {seconds:.2f} s for one concept")
    keep(out)
    for name in ("uce", "scapre"):
        erase(name, engine, "objects50", 1, overrides.get(name, {}))  # untimed: first-call costs
        out[f"{name}_s"] = {}
        for n in concept_counts:
            seconds, _, _ = erase(name, engine, "objects50", n, overrides.get(name, {}))
            out[f"{name}_s"][str(n)] = seconds
            log(f"{name}: {seconds:.2f} s for {n} concepts")
        keep(out)
    esd = overrides.get("esd", {}) | {"iterations": train_steps}
    seconds, info, _ = erase("esd", engine, "objects", 1, esd)
    out["esd_s_per_step"] = seconds / train_steps
    out["esd_train_set"] = info["train"]
    log(f"esd ({info['train']}): {seconds:.2f} s for {train_steps} steps")
    keep(out)
    mask = overrides.get("dynamic_mask", {}) | dynamic_mask_shape(train_steps) | {"progress": False}
    seconds, info, making = erase("dynamic_mask", engine, "objects", 1, mask)
    steps = sum(c["steps"] for c in info["concepts"])
    out["dynamic_mask_s_per_step"] = (seconds - making) / steps
    out["dynamic_mask_training_images_s"] = making
    log(f"dynamic_mask: {seconds - making:.2f} s for {steps} steps (+{making:.2f} s images)")
    return out
