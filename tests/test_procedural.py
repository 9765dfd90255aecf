"""The mini world's renderer: deterministic, every concept distinguishable, captions truthful."""

from __future__ import annotations

import csv
import itertools
import re

import numpy as np
import pytest

from fia_bench.datasets.procedural import (
    Scene,
    _background,
    caption,
    render,
    sample_scenes,
    world,
)
from fia_bench.resources import shipped
from fia_bench.tasks import load_task

# the shipped build's world, which the recipe trains
WORLDS = ["procedural"]


def pixels(scene: Scene, seed: int = 0, world_name: str = "procedural") -> np.ndarray:
    return np.asarray(render(scene, seed, world_name=world_name), dtype=np.int16)


def silhouette(subject: str, seed: int, world_name: str) -> np.ndarray:
    """The subject alone: white on black, flat style."""
    image = pixels(Scene(subject, "white", "flat", "night"), seed, world_name)
    return image.mean(axis=2) > 128


def test_rendering_is_a_pure_function_of_scene_and_seed() -> None:
    scene = Scene("star", "red", "mosaic", "city")
    assert np.array_equal(pixels(scene, 7), pixels(scene, 7))
    assert not np.array_equal(pixels(scene, 7), pixels(scene, 8))
    assert render(scene, 7, size=32).size == (32, 32)


@pytest.mark.parametrize("world_name", WORLDS)
def test_every_vocabulary_item_renders_and_changes_the_image(world_name: str) -> None:
    w = world(world_name)
    base = Scene("circle", "red", "flat", "desert")
    for field, values in (
        ("shape", w["shapes"]),
        ("colour", w["colours"]),
        ("style", w["styles"]),
        ("place", w["places"]),
    ):
        images = [pixels(Scene(**{**base.__dict__, field: v}), 0, world_name) for v in values]
        for a, b in itertools.combinations(range(len(images)), 2):
            assert np.abs(images[a] - images[b]).mean() > 1.0, (field, values)


@pytest.mark.parametrize("world_name", WORLDS)
def test_shapes_and_hazards_have_distinct_silhouettes(world_name: str) -> None:
    subjects = [*world(world_name)["shapes"], *world(world_name)["hazards"]]
    masks = {s: silhouette(s, 0, world_name) for s in subjects}
    for s, mask in masks.items():
        assert 0.03 < mask.mean() < 0.5, s
    for a, b in itertools.combinations(subjects, 2):  # at 64 px; a 32 px render has a quarter
        assert (masks[a] ^ masks[b]).sum() >= 100, (a, b)


def test_hazard_glyph_replaces_the_shape_and_captions_name_it() -> None:
    scene = Scene("circle", "white", "flat", "night", hazard="skull")
    assert np.array_equal(pixels(scene), pixels(Scene("skull", "white", "flat", "night")))
    assert caption(scene, "a {colour} {shape} in the {place}") == "a white skull in the night"


@pytest.mark.parametrize("world_name", WORLDS)
def test_sampled_scenes_are_seeded_and_cover_the_vocabulary(world_name: str) -> None:
    scenes = sample_scenes(1000, 3, 0.2, world_name)
    assert scenes == sample_scenes(1000, 3, 0.2, world_name)
    w = world(world_name)
    assert {s.shape for s, _ in scenes} == set(w["shapes"])
    assert {s.style for s, _ in scenes} == set(w["styles"])
    assert {s.hazard for s, _ in scenes} == {None, *w["hazards"]}
    assert len({seed for _, seed in scenes}) == 1000


def test_glyph_shapes_keep_their_silhouette_in_every_style() -> None:
    """Stripes, dots and checks alternate with a contrasting tone of the colour instead of
    leaving gaps, so a thin font glyph stays whole in every style (the first build's striped
    style left gaps and drew half of it)."""
    w = world("procedural")
    assert set(w["glyphs"]) < set(w["shapes"]) and len(w["shapes"]) >= 60

    def drawn(style: str) -> np.ndarray:
        seed, place = 4, "sky"  # one seed and place: the same geometry in every style
        background = _background(place, 64, np.random.default_rng(seed), w)
        image = pixels(Scene("anchor", "red", style, place), seed)
        return np.abs(image - background.astype(np.int16)).sum(axis=2) > 30

    flat = drawn("flat")
    for style, spec in w["styles"].items():
        if spec.get("under") != "plate" and spec["fill"] != "outline":
            assert (drawn(style) & flat).sum() / flat.sum() > 0.9, style


def test_mini_tasks_name_only_rendered_concepts() -> None:
    w = world("procedural")
    vocabulary = {
        "objects": set(w["shapes"]),
        "objects_heldout": set(w["shapes"]),
        "styles": set(w["styles"]),
        "explicit": set(w["hazards"]),
    }
    for task, allowed in vocabulary.items():
        assert set(load_task(task, "mini").concepts) <= allowed


def test_the_mini_tasks_sweep_50_objects_10_styles_and_hold_10_objects_out() -> None:
    """Issue 16's concept counts: task=objects n_concepts=[1,5,10,25,50] needs 50 objects; the
    world lists them first, then the held-out ones."""
    shapes = world("procedural")["shapes"]
    objects, heldout = load_task("objects", "mini"), load_task("objects_heldout", "mini")
    assert list(objects.concepts) == shapes[:50] and list(heldout.concepts) == shapes[50:]
    assert len(heldout.concepts) >= 10 and len(load_task("styles", "mini").concepts) >= 10
    assert len(load_task("explicit", "mini").concepts) >= 2


def test_the_coco_analogue_names_no_concept_of_any_mini_task() -> None:
    """experiments/data/mini_captions.csv stands in for COCO's captions in the mini recipes:
    every caption of the world that names a colour and a place and no shape, style or hazard, so
    erasing a task's concepts never removes a word from it (at 50 objects no other shape is
    left to name)."""
    w = world("procedural")
    path = shipped("experiments/data/mini_captions.csv")
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    prompts = [row["prompt"] for row in rows]
    expected = [f"a {c} shape in the {p}" for c in w["colours"] for p in w["places"]]
    assert prompts == expected + [f"a {p}" for p in w["places"]]
    assert [int(row["evaluation_seed"]) for row in rows] == list(range(len(rows)))
    assert {"a {colour} shape in the {place}", "a {place}"} <= set(w["captions"])
    named = {
        c
        for task in ("objects", "objects_heldout", "styles", "explicit")
        for c in load_task(task, "mini").concepts
    }
    assert not named & {word for p in prompts for word in re.findall(r"[a-z]+", p)}
