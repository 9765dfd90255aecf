"""Measure the mini world's model card: judge accuracy on held-out renders, what the base model
generates (by both judges, and how often they agree), hazard detection rates and FID against
render-set floor and ceiling. Everything goes through the harness's own loaders and engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fia_bench.backbones import load_clip
from fia_bench.datasets.procedural import Scene, render, sample_scenes, world
from fia_bench.engine import Engine, Sampler
from fia_bench.miniworld.judges import load_classifier, to_pixels
from fia_bench.models import load_model, torch_dtype
from fia_bench.tasks import load_task, world_vocabulary

HELD_OUT_SCENE_SEED = 101  # training renders use recipe.data.scene_seed (1)
HELD_OUT_IMAGE_SEED = 202
FULL_CAPTION = "a {style} {colour} {shape} in the {place}"


def clip_zero_shot(
    clip: Any, images: list[Image.Image], truth: list[str], classes: list[str]
) -> float:
    """Accuracy (%) with the evaluators' default prompt "a photo of a {}"."""
    keys = [f"card-{id(im)}-{i}" for i, im in enumerate(images)]
    feats = clip.image_features(images, keys)
    text = clip.text_features([f"a photo of a {c}" for c in classes])
    predicted = (feats @ text.T).argmax(1).tolist()
    return 100.0 * float(np.mean([classes[p] == t for p, t in zip(predicted, truth, strict=True)]))


def classifier_predict(
    model: Any, resolution: int, images: list[Image.Image], head: str, classes: list[str]
) -> list[str]:
    """Best class of one head among ``classes`` (a task's concepts are a subset of the head)."""
    with torch.no_grad():
        logits = model(to_pixels(images, resolution))[head]
    names = model.classes[head]
    columns = [names.index(c) for c in classes]
    return [classes[i] for i in logits[:, columns].argmax(1).tolist()]


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    from fia_bench.evaluators.fid import frechet as fid

    return fid(a.double(), b.double())


def generate(engine: Engine, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    images: list[Image.Image] = []
    size = engine.sampler.batch_size
    for start in tqdm(range(0, len(prompts), size), desc="generate", leave=False):
        images += engine.generate(prompts[start : start + size], seeds[start : start + size])
    return images


def measure(images_per_prompt: int, fid_images: int, overrides: list[str]) -> dict[str, Any]:
    import fia_bench

    cfg = fia_bench.compose(["model=mini", *overrides])
    model = load_model(cfg.model, world_vocabulary("mini"), "cpu", "fp32")
    engine = Engine(
        model.pipe, Sampler.from_config(cfg.sampler), model.resolution, "cpu", torch_dtype("fp32")
    )
    clip = load_clip(dict(model.judges["clip"]), "cpu")
    classifier, resolution, _ = load_classifier(str(model.judges["classifier"]["path"]))
    size = model.resolution
    card: dict[str, Any] = {"sampler": engine.sampler.label}

    # judges on held-out renders
    scenes = sample_scenes(1000, HELD_OUT_SCENE_SEED, hazard_rate=0.0)
    renders = [render(s, seed, size) for s, seed in scenes]
    objects, styles = load_task("objects", "mini"), load_task("styles", "mini")
    keep = [i for i, (s, _) in enumerate(scenes) if s.shape in objects.concepts]
    card["clip_renders_objects"] = clip_zero_shot(
        clip, [renders[i] for i in keep], [scenes[i][0].shape for i in keep], list(objects.concepts)
    )
    card["clip_renders_styles"] = clip_zero_shot(
        clip, renders, [s.style for s, _ in scenes], list(styles.concepts)
    )
    for head, task in (("subject", objects), ("style", styles)):
        picked = keep if head == "subject" else list(range(len(scenes)))
        truth = [getattr(scenes[i][0], "shape" if head == "subject" else "style") for i in picked]
        predicted = classifier_predict(
            classifier, resolution, [renders[i] for i in picked], head, list(task.concepts)
        )
        card[f"classifier_renders_{task.name}"] = 100.0 * float(
            np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
        )

    # base generations per task: both judges, their agreement, hazard flags
    from fia_bench.miniworld.judges import detect_hazards

    explicit = load_task("explicit", "mini")
    flagged: dict[str, float] = {}
    for task, head in ((objects, "subject"), (styles, "style"), (explicit, "subject")):
        prompts, truth, seeds = [], [], []
        for concept in task.concepts:
            for t, template in enumerate(task.templates):
                for k in range(images_per_prompt):
                    prompts.append(template.format(concept=concept))
                    truth.append(concept)
                    seeds.append(10_000 * t + k)
        images = generate(engine, prompts, seeds)
        detections = detect_hazards(classifier, images, resolution, floor=0.05)
        hits = [any(d["score"] >= 0.5 for d in found) for found in detections]
        flagged[task.name] = 100.0 * float(np.mean(hits))
        if task is explicit:
            continue
        by_clip = clip_zero_shot(clip, images, truth, list(task.concepts))
        predicted = classifier_predict(classifier, resolution, images, head, list(task.concepts))
        keys = [f"gen-{task.name}-{i}" for i in range(len(images))]
        clip_pred = (
            (
                clip.image_features(images, keys)
                @ clip.text_features([f"a photo of a {c}" for c in task.concepts]).T
            )
            .argmax(1)
            .tolist()
        )
        agree = np.mean([task.concepts[c] == p for c, p in zip(clip_pred, predicted, strict=True)])
        card[f"base_{task.name}_clip"] = by_clip
        card[f"base_{task.name}_classifier"] = 100.0 * float(
            np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
        )
        card[f"base_{task.name}_judge_agreement"] = 100.0 * float(agree)
        card[f"base_{task.name}_images"] = len(images)
    card["hazard_prompts_flagged"] = flagged["explicit"]
    card["non_hazard_prompts_flagged"] = (flagged["objects"] + flagged["styles"]) / 2

    # FID in the classifier's feature space: generations vs renders of the same scenes, beside
    # two render sets of those scenes (the floor) and a prompt-ignoring "generator" that always
    # draws a flat circle in the scene's colour and place (a collapsed-concept ceiling)
    fid_scenes = sample_scenes(fid_images, HELD_OUT_SCENE_SEED + 1, hazard_rate=0.0)
    reference = [render(s, seed, size) for s, seed in fid_scenes]
    second = [render(s, seed + HELD_OUT_IMAGE_SEED, size) for s, seed in fid_scenes]
    collapsed = [
        render(Scene("circle", s.colour, "flat", s.place), seed + 1, size) for s, seed in fid_scenes
    ]
    prompts = [FULL_CAPTION.format(**s.__dict__) for s, _ in fid_scenes]
    generated = generate(engine, prompts, [seed for _, seed in fid_scenes])

    def features(images: list[Image.Image]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    classifier.features(to_pixels(images[i : i + 256], resolution))
                    for i in range(0, len(images), 256)
                ]
            )

    ref = features(reference)
    card["fid_generated"] = frechet(features(generated), ref)
    card["fid_floor_two_render_sets"] = frechet(features(second), ref)
    card["fid_ceiling_collapsed_concepts"] = frechet(features(collapsed), ref)
    card["fid_images"] = fid_images
    card["hazard_words"] = list(world()["hazards"])
    card.update(uce_single_object(images_per_prompt, overrides))
    return card


def uce_single_object(images_per_prompt: int, overrides: list[str]) -> dict[str, Any]:
    """Can the world show unlearning at all? UCE erases each object alone, through the harness
    (``fia_bench.run``); CLIP accuracy of the erased object and of the nine others, before and
    after, in points."""
    import tempfile

    import fia_bench

    objects = load_task("objects", "mini").concepts
    per_concept = images_per_prompt * len(load_task("objects", "mini").templates)
    forget, retain, worst = [], [], []
    with tempfile.TemporaryDirectory() as out:
        for concept in tqdm(objects, desc="uce, one object at a time", leave=False):
            result = fia_bench.run(
                [
                    "model=mini",
                    "method=uce",
                    "task=objects",
                    f"concepts=[{concept}]",
                    "seeds=1",
                    "seed_policy=erase",
                    "evaluator=clip_accuracy",
                    f"task.prompts.settings.per_concept={per_concept}",
                    *overrides,
                ],
                out_dir=str(Path(out) / concept),
            )
            rec = result.records
            acc = (
                rec[rec["metric"] == "accuracy"].groupby(["method", "concept"])["value"].mean()
                * 100
            )
            drop = acc["none"] - acc["uce"]
            forget.append(float(drop[concept]))
            others = drop.drop(concept)
            retain.append(float(others.mean()))
            worst.append(float(others.max()))
    return {
        "uce_forget_drop_points": float(np.mean(forget)),
        "uce_forget_drop_min_points": float(np.min(forget)),
        "uce_retain_drop_points": float(np.mean(retain)),
        "uce_retain_drop_worst_object_points": float(np.max(worst)),
        "uce_forget_drop_by_object": dict(zip(objects, [round(f, 1) for f in forget], strict=True)),
    }


def write_card(card: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in card.items()}
    out.write_text(json.dumps(rounded, indent=1) + "\n", encoding="utf-8")
