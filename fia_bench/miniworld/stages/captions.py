"""The stages trained on captions: the CLIP judge, and (for a recipe with a ``text`` section)
the generator's text encoder trained apart against the judge's frozen image tower. Both share
one objective, ``caption_loss``, and one batch draw, ``caption_batches``."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fia_bench.datasets.procedural import world
from fia_bench.miniworld.build_files import as_unit, flat, save_tensors
from fia_bench.miniworld.nets import OPENAI_MEAN, OPENAI_STD, build_text_encoder, clip_model_cfg
from fia_bench.miniworld.renders import augment, captions_for
from fia_bench.miniworld.state import BuildState

NAMED = ("subject", "style")  # attributes the tasks ask the CLIP judge to name zero-shot

Batch = tuple[np.ndarray, torch.Tensor, list[str], list[dict[str, int]]]


def caption_batches(state: BuildState, batch_size: int) -> Callable[[torch.Generator], Batch]:
    """What the caption-trained stages draw at each step: render indices, the augmented images
    normalised as CLIP's input, captions, and what each caption states."""
    pixels = as_unit(state.data["images"])
    recon = state.reconstructions()
    mean = torch.tensor(OPENAI_MEAN, device=state.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=state.device).view(1, 3, 1, 1)
    w = world(state.world)
    templates = [*w["captions"], *w["judge_captions"]]

    def draw(g: torch.Generator) -> Batch:
        idx = torch.randint(len(pixels), (batch_size,), generator=g)
        x = (augment(pixels, recon, idx, state.r["augment"], g).to(state.device) + 1) / 2
        captions, stated = captions_for(state.data, idx.numpy(), templates, g, state.classes)
        return idx.numpy(), (x - mean) / std, captions, stated

    return draw


def caption_loss(
    state: BuildState,
    image: torch.Tensor,
    encode_text: Callable[[list[str]], torch.Tensor],
    scale: torch.Tensor,
    batch: Batch,
    zero_shot_weight: float,
) -> torch.Tensor:
    """The CLIP judge's objective, for any text tower (``encode_text``: texts to unit features)
    against unit image features: each caption against each image of the batch, where caption j
    describes image i when every attribute it states matches image i, plus each image against
    every class prompt of a task (CLIP's zero-shot read-out: captions name the shape in few
    pairs of a batch, so shapes alone learn slowly)."""
    idx, _, captions, stated = batch
    logits = scale * image @ encode_text(captions).T
    match = torch.ones(len(idx), len(idx), dtype=torch.bool)
    for k in state.classes:
        values = torch.from_numpy(state.data[k][idx])
        stated_k = torch.tensor([s.get(k, -1) for s in stated])
        match &= (stated_k.view(1, -1) == -1) | (stated_k.view(1, -1) == values.view(-1, 1))
    target = match.float().to(state.device)
    loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    zero_shot = sum(
        F.cross_entropy(
            scale * image @ encode_text([f"a photo of a {c}" for c in state.classes[k]]).T,
            torch.from_numpy(state.data[k][idx]).to(state.device),
        )
        for k in NAMED
    )
    return (loss_i + loss_t) / 2 + zero_shot_weight * zero_shot


def train_clip(state: BuildState) -> bool:
    import open_clip

    cfg = state.r["clip"]
    model = open_clip.CLIP(**clip_model_cfg(state.r)).to(state.device)
    tokenizer = open_clip.SimpleTokenizer(context_length=state.r["tokenizer_max_length"])
    loop = state.loop("clip", {"clip": model})
    draw = caption_batches(state, cfg["batch_size"])

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        batch = draw(g)
        return caption_loss(
            state,
            model.encode_image(batch[1], normalize=True),
            lambda texts: model.encode_text(tokenizer(texts).to(state.device), normalize=True),
            model.logit_scale.exp(),
            batch,
            cfg["zero_shot_weight"],
        )

    if not loop.run(state.seed, loss_fn, state.limits):
        return False
    from safetensors.torch import save_file

    out = state.build / "export" / "clip"
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": clip_model_cfg(state.r),
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=1), "utf-8")
    weights = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / "open_clip_model.safetensors")
    return True


def train_text(state: BuildState) -> bool:
    """The generator's text encoder trained apart and then frozen, as SD's CLIP text encoder is
    (a recipe with a ``text`` section): the world's tokenizer, trained with the judge's
    objective against the CLIP judge's image tower, which stays fixed (locked-image tuning).
    Trained jointly with the UNet, as the first two builds' were, an encoder lets the UNet read
    every object from padding rows that hardly differ between objects, and UCE's edit of one
    object then reaches all (docs/mini_world.md). Without the section the encoder trains in
    the generator stage and this stage does nothing."""
    cfg = state.r.get("text")
    if cfg is None:
        return True
    judge = state.clip_judge()
    text_encoder = build_text_encoder(state.r, state.tokenizer).to(state.device)
    width = state.r["text_encoder"]["hidden_size"]
    projection = nn.Linear(width, state.r["clip"]["embed_dim"], bias=False).to(state.device)
    loop = state.loop("text", {"text_encoder": text_encoder, "projection": projection})
    draw = caption_batches(state, cfg["batch_size"])

    def encode_text(texts: list[str]) -> torch.Tensor:
        ids = state.token_ids(texts).to(state.device)
        return F.normalize(projection(text_encoder(ids).pooler_output), dim=-1)

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        batch = draw(g)
        with torch.no_grad():
            image = judge.encode_image(batch[1], normalize=True)
        scale = judge.logit_scale.exp().detach()
        return caption_loss(state, image, encode_text, scale, batch, cfg["zero_shot_weight"])

    if not loop.run(state.seed, loss_fn, state.limits):
        return False
    final = {"text_encoder": loop.final_state("text_encoder")}
    save_tensors(state.build / "text.safetensors", flat(final, "final"))
    return True
