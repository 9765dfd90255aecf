"""The text-row measure behind the card's UCE diagnosis (fia_bench.miniworld.text_rows)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_pipe

from fia_bench.backbones import load_clip
from fia_bench.miniworld.text_rows import open_clip_encode, pipeline_encode, row_similarity
from fia_bench.tasks import load_task

# one word each, as the mini world's objects are: padding rows then align position by position
OBJECTS = [c for c in load_task("objects", "tiny").concepts if " " not in c]


def test_a_template_that_adds_nothing_matches_every_row_of_its_own_object() -> None:
    pipe = tiny_pipe()
    rows = row_similarity(pipeline_encode(pipe.text_encoder, pipe.tokenizer), OBJECTS, "{}")
    assert rows["word_row_same"] == pytest.approx(1.0)
    assert rows["padding_rows_same"] == pytest.approx(1.0)
    assert rows["word_row_other"] < 1.0


def test_padding_rows_that_cannot_see_the_word_carry_no_object() -> None:
    """With every attention output zeroed, a row depends on its own token and position only, so a
    padding row is the same whichever object came before it."""
    pipe = tiny_pipe()
    with torch.no_grad():
        for layer in pipe.text_encoder.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    rows = row_similarity(pipeline_encode(pipe.text_encoder, pipe.tokenizer), OBJECTS)
    assert rows["padding_rows_same"] == pytest.approx(rows["padding_rows_other"], abs=1e-4)
    assert rows["word_row_same"] > rows["word_row_other"]


def test_open_clip_rows_are_the_ones_its_text_features_pool() -> None:
    """The end-token row (the one after the word), projected, is open_clip's own text feature."""
    clip = load_clip({"arch": "tiny_random", "seed": 0}, "cpu")
    encode = open_clip_encode(clip.model, clip.tokenizer)
    hidden, word = encode(OBJECTS)
    pooled = torch.stack([hidden[i, w + 1] for i, w in enumerate(word)]).float()
    with torch.no_grad():
        features = clip.model.encode_text(clip.tokenizer(OBJECTS))
    torch.testing.assert_close(pooled @ clip.model.text_projection, features)
    assert row_similarity(encode, OBJECTS, "{}")["word_row_same"] == pytest.approx(1.0)
