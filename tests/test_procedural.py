"""The mini world's renderer: deterministic, every concept distinguishable, captions truthful."""

from __future__ import annotations

import itertools

import numpy as np

from fia_bench.datasets.procedural import Scene, caption, render, sample_scenes, world
from fia_bench.tasks import load_task


def pixels(scene: Scene, seed: int = 0) -> np.ndarray:
    return np.asarray(render(scene, seed), dtype=np.int16)


def silhouette(subject: str, seed: int) -> np.ndarray:
    """The subject alone: white on black, flat style."""
    image = pixels(Scene(subject, "white", "flat", "night"), seed)
    return image.mean(axis=2) > 128


def test_rendering_is_a_pure_function_of_scene_and_seed() -> None:
    scene = Scene("star", "red", "mosaic", "city")
    assert np.array_equal(pixels(scene, 7), pixels(scene, 7))
    assert not np.array_equal(pixels(scene, 7), pixels(scene, 8))
    assert render(scene, 7, size=32).size == (32, 32)


def test_every_vocabulary_item_renders_and_changes_the_image() -> None:
    w = world()
    base = Scene("circle", "red", "flat", "desert")
    for field, values in (
        ("shape", w["shapes"]),
        ("colour", w["colours"]),
        ("style", w["styles"]),
        ("place", w["places"]),
    ):
        images = [pixels(Scene(**{**base.__dict__, field: v})) for v in values]
        for a, b in itertools.combinations(range(len(images)), 2):
            assert np.abs(images[a] - images[b]).mean() > 1.0, (field, values)


def test_shapes_and_hazards_have_distinct_silhouettes() -> None:
    subjects = [*world()["shapes"], *world()["hazards"]]
    masks = {s: silhouette(s, 0) for s in subjects}
    for s, mask in masks.items():
        assert 0.03 < mask.mean() < 0.5, s
    for a, b in itertools.combinations(subjects, 2):
        inter = (masks[a] & masks[b]).sum()
        union = (masks[a] | masks[b]).sum()
        assert inter / union < 0.85, (a, b)


def test_hazard_glyph_replaces_the_shape_and_captions_name_it() -> None:
    scene = Scene("circle", "white", "flat", "night", hazard="skull")
    assert np.array_equal(pixels(scene), pixels(Scene("skull", "white", "flat", "night")))
    assert caption(scene, "a {colour} {shape} in the {place}") == "a white skull in the night"


def test_sampled_scenes_are_seeded_and_cover_the_vocabulary() -> None:
    scenes = sample_scenes(400, seed=3, hazard_rate=0.2)
    assert scenes == sample_scenes(400, seed=3, hazard_rate=0.2)
    assert {s.shape for s, _ in scenes} == set(world()["shapes"])
    assert {s.hazard for s, _ in scenes} == {None, *world()["hazards"]}
    assert len({seed for _, seed in scenes}) == 400


def test_mini_tasks_name_only_rendered_concepts() -> None:
    w = world()
    vocabulary = {
        "objects": set(w["shapes"]),
        "styles": set(w["styles"]),
        "explicit": set(w["hazards"]),
    }
    for task, allowed in vocabulary.items():
        assert set(load_task(task, "mini").concepts) <= allowed
