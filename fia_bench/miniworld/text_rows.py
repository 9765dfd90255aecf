"""How much of an object the text encoder's rows carry, row by row. UCE's default rule edits the
erased word's row and every padding row after it; where padding rows are nearly as alike between
two objects as between "circle" and "a circle", that edit reaches every object, and the card's
UCE collateral follows (docs/mini_world.md, "Where UCE's collateral comes from")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TEMPLATE = "a {}"


@torch.no_grad()
def row_similarity(
    text_encoder: Any, tokenizer: Any, objects: list[str], template: str = TEMPLATE
) -> dict[str, float]:
    """Mean cosine between a bare object word's rows and the rows of ``template`` filled with
    the same object ("same") or with each other object ("other"): the word's own row, and the
    padding rows after it, aligned from the word on (position by position when every object is
    one token, as the mini world's are)."""

    def encode(texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        )
        hidden = text_encoder(input_ids=ids.input_ids)[0].double()
        return hidden, (ids.attention_mask.sum(1) - 2).tolist()

    bare, bare_word = encode(objects)
    filled, filled_word = encode([template.format(o) for o in objects])
    length = bare.shape[1] - 1 - max(bare_word + filled_word)
    word_a = torch.stack([bare[i, w] for i, w in enumerate(bare_word)])
    word_b = torch.stack([filled[i, w] for i, w in enumerate(filled_word)])
    pad_a = torch.stack([bare[i, w + 1 : w + 1 + length] for i, w in enumerate(bare_word)])
    pad_b = torch.stack([filled[i, w + 1 : w + 1 + length] for i, w in enumerate(filled_word)])
    words = F.normalize(word_a, dim=-1) @ F.normalize(word_b, dim=-1).T
    # (objects, objects): mean over the aligned padding positions of each pair's cosine
    pads = torch.einsum("ipd,jpd->ij", F.normalize(pad_a, dim=-1), F.normalize(pad_b, dim=-1))
    pads = pads / length
    off = ~torch.eye(len(objects), dtype=torch.bool)
    return {
        "objects": len(objects),
        "padding_rows": length,
        "word_row_same": round(words.diagonal().mean().item(), 4),
        "word_row_other": round(words[off].mean().item(), 4),
        "padding_rows_same": round(pads.diagonal().mean().item(), 4),
        "padding_rows_other": round(pads[off].mean().item(), 4),
    }


def shipped_row_similarity(pipeline: Path | None = None) -> dict[str, float]:
    """``row_similarity`` of a pipeline folder's text encoder (default: the shipped mini world's)
    over the objects task."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from fia_bench.miniworld.train import weights_dir
    from fia_bench.tasks import load_task

    folder = pipeline or weights_dir() / "pipeline"
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return row_similarity(text_encoder, tokenizer, list(load_task("objects", "mini").concepts))
