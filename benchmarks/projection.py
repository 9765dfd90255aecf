"""GPU-hours to reproduce a paper table for several methods and seeds, from measured rates.

Without the cache every (method, seed) job makes its edited model's images, the reference
model's images (the harness evaluates the reference in every job) and its training images. With
it, the reference's images are made once, an edit that every seed shares (``seed_invariant``)
has its images made once, and training images of the base model are shared by all seeds; a
re-run of the same command makes nothing. Erasures run once per (method, seed) either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.registry import METHODS

PROTOCOL_FILE = Path(__file__).with_name("protocol.yaml")


@dataclass(frozen=True)
class ImageCounts:
    reference: int
    edited: int
    training: int

    @property
    def total(self) -> int:
        return self.reference + self.edited + self.training


def images_per_model(images: dict[str, list[int]]) -> int:
    return sum(math.prod(factors) for factors in images.values())


def image_counts(
    per_model: int,
    n_concepts: int,
    methods: list[str],
    seeds: int,
    seed_invariant: list[str],
    training_per_concept: dict[str, int],
    cached: bool,
) -> ImageCounts:
    """Images one reproduction generates; ``training_per_concept`` holds base-model images a
    method trains on (Dynamic Mask), whose seeds do not depend on the erasure seed."""
    training = sum(training_per_concept.get(m, 0) for m in methods) * n_concepts
    if not cached:
        jobs = len(methods) * seeds
        return ImageCounts(per_model * jobs, per_model * jobs, training * seeds)
    distinct_edits = sum(1 if m in seed_invariant else seeds for m in methods)
    return ImageCounts(per_model, per_model * distinct_edits, training)


def load_protocol(path: Path = PROTOCOL_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def method_settings(name: str) -> dict[str, Any]:
    """A method's shipped settings (conf/method/<name>.yaml), as a harness job would pass them."""
    path = Path(__file__).resolve().parent.parent / "conf" / "method" / f"{name}.yaml"
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")).get("settings") or {})


def training_lengths() -> dict[str, float]:
    """Paper-scale training lengths, read from the methods built with their shipped settings
    (so a changed default changes the projection): ESD iterations per edit (shared by all
    targets), Dynamic Mask steps and base-model training images per concept."""
    esd = METHODS.get("esd")(**method_settings("esd"))
    mask = METHODS.get("dynamic_mask")(**method_settings("dynamic_mask"))
    s = mask.settings
    return {
        "esd_iterations": esd.iterations,
        "dynamic_mask_steps_per_concept": s.epochs
        * math.ceil(mask.images_per_class / s.batch_size),
        "dynamic_mask_images_per_concept": 2 * mask.images_per_class,
    }


def erase_seconds(
    method: str, n_concepts: int, timing: dict[str, Any], lengths: dict[str, float]
) -> float:
    """One edit of ``n_concepts`` concepts from the measured costs: FIA linear in concepts; UCE
    and ScaPre on the line through their two timed concept counts; ESD per iteration (one run
    covers every target); Dynamic Mask per step, concept after concept."""
    if method == "fia":
        return timing["fia_s_per_concept"] * n_concepts
    if method in ("uce", "scapre"):
        (n0, t0), (n1, t1) = sorted((int(n), t) for n, t in timing[f"{method}_s"].items())
        return max(0.0, t0 + (t1 - t0) * (n_concepts - n0) / (n1 - n0))
    if method == "esd":
        return timing["esd_s_per_step"] * lengths["esd_iterations"]
    if method == "dynamic_mask":
        steps = lengths["dynamic_mask_steps_per_concept"] * n_concepts
        return timing["dynamic_mask_s_per_step"] * steps
    raise unknown_choice("method", method, ["fia", "uce", "scapre", "esd", "dynamic_mask"])


def project(
    protocol: dict[str, Any],
    rates: dict[str, float],
    timing: dict[str, float],
    lengths: dict[str, float],
) -> list[dict[str, Any]]:
    """One row per (table, regime): images, hours generating and erasing. ``rates`` maps a
    regime's generator (``naive``, ``engine``) to images/s."""
    methods, seeds = list(protocol["methods"]), int(protocol["seeds"])
    if seeds < 1 or not methods:
        raise FiaBenchError(f"{PROTOCOL_FILE.name}: needs methods and seeds >= 1")
    training = {"dynamic_mask": int(lengths["dynamic_mask_images_per_concept"])}
    rows = []
    for name, table in protocol["tables"].items():
        n = int(table["n_concepts"])
        per_model = images_per_model(table["images"])
        erase_h = seeds * sum(erase_seconds(m, n, timing, lengths) for m in methods) / 3600
        for regime, generator, cached in [
            ("naive loop, no cache", "naive", False),
            ("engine, no cache", "engine", False),
            ("engine + cache", "engine", True),
        ]:
            counts = image_counts(
                per_model, n, methods, seeds, protocol["seed_invariant"], training, cached
            )
            generate_h = counts.total / rates[generator] / 3600
            rows.append(
                {
                    "table": name,
                    "title": table["title"],
                    "regime": regime,
                    "images_per_model": per_model,
                    "images": counts.total,
                    "reference_images": counts.reference,
                    "edited_images": counts.edited,
                    "training_images": counts.training,
                    "generate_h": generate_h,
                    "erase_h": erase_h,
                    "total_h": generate_h + erase_h,
                }
            )
    return rows
