"""How much of an object the text encoder's rows carry, row by row. UCE's default rule edits the
erased word's row and every padding row after it; where padding rows are nearly as alike between
two objects as between "circle" and "a circle", that edit reaches every object, and the card's
UCE collateral follows (docs/mini_world.md, "Where UCE's collateral comes from"). A text tower
trained apart (the mini world's CLIP judge's) is measured the same way, so a candidate encoder
for a next build can be judged before any generator is trained on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fia_bench.engine import last_word_pieces
from fia_bench.errors import FiaBenchError

TEMPLATE = "a {}"
# texts -> (hidden states: texts × context × width, index of each text's last word-piece)
Encode = Callable[[list[str]], tuple[torch.Tensor, list[int]]]


def pipeline_encode(text_encoder: Any, tokenizer: Any) -> Encode:
    """A diffusers pipeline's text encoder, padded to its full context as the engine pads."""

    @torch.no_grad()
    def encode(texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        )
        hidden = text_encoder(input_ids=ids.input_ids)[0].double()
        return hidden, last_word_pieces(ids.attention_mask)

    return encode


def open_clip_encode(model: Any, tokenizer: Any) -> Encode:
    """An open_clip CLIP's text tower: its rows after the final layer norm, before pooling."""

    @torch.no_grad()
    def encode(texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        ids = tokenizer(texts)
        x = model.token_embedding(ids) + model.positional_embedding
        hidden = model.ln_final(model.transformer(x, attn_mask=model.attn_mask)).double()
        return hidden, (ids.argmax(dim=1) - 1).tolist()  # the end token has the largest id

    return encode


def row_similarity(encode: Encode, objects: list[str], template: str = TEMPLATE) -> dict[str, Any]:
    """Mean cosine between a bare object word's rows and the rows of ``template`` filled with
    the same object ("same") or with each other object ("other"): the word's own row, and the
    padding rows after it, aligned from the word on (position by position when every object is
    one token, as the mini world's are)."""
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


def measure(
    pipeline: Path | None = None,
    clip: Path | None = None,
    build: Path | None = None,
    recipe_path: Path | None = None,
) -> dict[str, Any]:
    """``row_similarity`` over the objects task of a pipeline folder's text encoder (default:
    the shipped mini world's), of an open_clip folder's text tower, or of the encoder a build's
    text stage trained (before any generator is trained on it)."""
    from fia_bench.miniworld.build_files import weights_dir
    from fia_bench.miniworld.state import BuildState
    from fia_bench.tasks import load_task

    objects = list(load_task("objects", "mini").concepts)
    if build is not None:
        if not (build / "text.safetensors").is_file():
            raise FiaBenchError(f"{build}: no finished text stage (text.safetensors)")
        builder = BuildState(build, recipe_path=recipe_path)
        tokenizer = builder.tokenizer
        text_encoder = builder.frozen_text_encoder()
        if text_encoder is None:
            raise FiaBenchError(
                f"{recipe_path or 'the recipe'} has no text section: the build's text encoder "
                "trains with its UNet; measure its export with --pipeline"
            )
        return row_similarity(pipeline_encode(text_encoder, tokenizer), objects)
    if clip is not None:
        from fia_bench.backbones import load_clip

        judge = load_clip({"arch": f"local-dir:{clip}"}, "cpu")
        return row_similarity(open_clip_encode(judge.model, judge.tokenizer), objects)
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = pipeline or weights_dir() / "pipeline"
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return row_similarity(pipeline_encode(text_encoder, tokenizer), objects)
