"""The mini world's networks, built from a recipe: SD's architectures (diffusers' VAE and UNet,
transformers' CLIP text encoder) at the recipe's sizes, and the open_clip judge's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def compute_in_fp32(config: Path) -> None:
    """The weights are stored in fp16 to keep the repository small; the text encoder's config
    says float32 so that a plain ``StableDiffusionPipeline.from_pretrained`` (transformers loads
    in the config's dtype, diffusers in fp32) computes both models in one dtype."""
    data = json.loads(config.read_text("utf-8"))
    data["dtype"] = "float32"
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")


def build_vae(r: dict[str, Any], scaling_factor: float = 1.0) -> nn.Module:
    from diffusers import AutoencoderKL

    cfg = r["vae"]
    n = len(cfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        norm_num_groups=cfg["norm_num_groups"],
        mid_block_add_attention=cfg["mid_block_attention"],
        sample_size=r["resolution"],
        scaling_factor=scaling_factor,
    )


def build_text_encoder(r: dict[str, Any], tokenizer: Any) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=r["tokenizer_max_length"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **r["text_encoder"],
        )
    )


def build_unet(r: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    cfg = dict(r["unet"])
    factor = 2 ** (len(r["vae"]["block_out_channels"]) - 1)
    return UNet2DConditionModel(
        sample_size=r["resolution"] // factor,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=r["text_encoder"]["hidden_size"],
        block_out_channels=tuple(cfg.pop("block_out_channels")),
        attention_head_dim=tuple(cfg.pop("attention_head_dim")),
        down_block_types=tuple(cfg.pop("down_block_types")),
        up_block_types=tuple(cfg.pop("up_block_types")),
        **cfg,
    )


def clip_model_cfg(r: dict[str, Any]) -> dict[str, Any]:
    c = r["clip"]
    return {
        "embed_dim": c["embed_dim"],
        "vision_cfg": {**c["vision"], "image_size": r["resolution"]},
        "text_cfg": {
            **c["text"],
            "context_length": r["tokenizer_max_length"],
            "vocab_size": 49408,
        },
    }
