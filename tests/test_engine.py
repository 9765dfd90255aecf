"""Generation: an image depends on its prompt and seed only, never on its batch."""

from __future__ import annotations

import numpy as np
from tiny import tiny_engine

from fia_bench.models import word_tokenizer
from fia_bench.tasks import load_task, world_vocabulary


def test_image_does_not_depend_on_batch_size_or_position() -> None:
    engine = tiny_engine()
    batch = engine.generate(
        ["a photo of a tench", "a photo of a church", "an image of a tench"], [3, 7, 11]
    )
    alone = engine.generate(["a photo of a church"], [7])
    assert np.array_equal(np.asarray(batch[1]), np.asarray(alone[0]))
    reordered = engine.generate(["an image of a tench", "a photo of a tench"], [11, 3])
    assert np.array_equal(np.asarray(batch[0]), np.asarray(reordered[1]))


def test_seed_and_prompt_change_the_image() -> None:
    engine = tiny_engine()
    a, b, c = engine.generate(["a photo of a tench"] * 2 + ["a photo of a church"], [1, 2, 1])
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_world_tokenizer_spells_every_concept_word_as_one_token() -> None:
    tokenizer = word_tokenizer(world_vocabulary("tiny"))
    for task in ("objects", "styles", "explicit"):
        for concept in load_task(task, "tiny").concepts:
            for word in concept.split():
                ids = tokenizer(word).input_ids
                assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
