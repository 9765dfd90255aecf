"""Load an SD-v1-layout pipeline from a model config: built in code (tests, benchmarks) or from a
diffusers directory / hub id (the mini world, SD v1.4/v1.5). Every world goes through the same
``StableDiffusionPipeline`` object so that methods address modules by their SD names."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fia_bench.cache import hash_tensors
from fia_bench.errors import FiaBenchError, unknown_choice

COMPONENTS = ("unet", "text_encoder", "vae")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@dataclass
class LoadedModel:
    name: str
    world: str
    pipe: Any  # diffusers.StableDiffusionPipeline
    resolution: int
    judges: dict[str, Any]
    fingerprint: str


def torch_dtype(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise unknown_choice("precision", precision, DTYPES, "precision=")
    return DTYPES[precision]


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on our word list until every word is a single symbol.

    Encoding replays merges in the order they were learned, which reproduces the training
    segmentation, so each listed word is exactly one token.
    """
    words_split = [[*w[:-1], w[-1] + "</w>"] for w in sorted({w.lower() for w in words if w})]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for parts in words_split:
            for pair in itertools.pairwise(parts):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for parts in words_split:
            i = 0
            while i < len(parts) - 1:
                if (parts[i], parts[i + 1]) == best:
                    parts[i : i + 2] = [parts[i] + parts[i + 1]]
                i += 1


def word_tokenizer(words: Iterable[str], max_length: int = 77):
    """A CLIP BPE tokenizer for our own vocabulary: each listed word is one token.

    Byte-level single characters stay in the vocabulary, so any text still tokenizes; only the
    words we list become single tokens, which keeps token-level edits (UCE, ScaPre) meaningful.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    merges = learn_merges(words)
    tokens = [
        *alphabet,
        *(c + "</w>" for c in alphabet),
        "<|startoftext|>",
        "<|endoftext|>",
        *(a + b for a, b in merges),
    ]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# Component configs of the architectures we can build without downloading anything. ``sd_v1`` is
# SD v1.4/v1.5 exactly (859,520,964 UNet, 83,653,863 VAE and 123,060,480 text-encoder
# parameters); ``tiny`` keeps its block types and module names with small widths.
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
        ),
        "vae": dict(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            norm_num_groups=16,
        ),
        "text": dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2
        ),
    },
    "sd_v1": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        ),
        "text": dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
        ),
    },
}


def random_pipeline(architecture: str, vocabulary: Iterable[str], resolution: int, seed: int):
    """An SD-v1-layout pipeline with seeded random weights, built from ``ARCHITECTURES``.

    The tokenizer is our own word tokenizer (the real CLIP vocabulary would need a download); the
    text encoder's embedding table keeps the architecture's size when it has one.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if architecture not in ARCHITECTURES:
        raise unknown_choice("architecture", architecture, ARCHITECTURES, "model.architecture")
    arch = ARCHITECTURES[architecture]
    tokenizer = word_tokenizer(vocabulary)
    vae_factor = 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // vae_factor, in_channels=4, out_channels=4, **arch["unet"]
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution, **arch["vae"]
    )
    text = {"vocab_size": len(tokenizer)} | arch["text"]
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens exceeds the text encoder's table")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text,
        )
    )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet)


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any):
    """An SD v1 pipeline of these components with SD's DDIM scheduler and no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def quiet_loading() -> None:
    """diffusers' and transformers' per-component loading and saving bars say nothing the run's
    own progress lines do not, and fill log files; they are switched off."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def pretrained_pipeline(source: str, revision: str | None, dtype: torch.dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    quiet_loading()
    local = Path(source).expanduser()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else source,
            revision=None if local.exists() else revision,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except OSError as err:
        raise FiaBenchError(
            f"cannot load model '{source}': {str(err).splitlines()[0]} "
            "(give a local diffusers directory with model.source=/path, or go online once)"
        ) from err
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def weights_fingerprint(pipe: Any) -> str:
    """sha256 over every weight of the components a method can edit; names included."""
    return hash_tensors(
        (f"{component}.{name}", tensor)
        for component in COMPONENTS
        for name, tensor in sorted(getattr(pipe, component).state_dict().items())
    )


def load_model(cfg: Any, vocabulary: Iterable[str], device: str, precision: str) -> LoadedModel:
    dtype = torch_dtype(precision)
    if cfg.weights == "random":
        pipe = random_pipeline(
            str(cfg.architecture), vocabulary, int(cfg.resolution), int(cfg.get("seed", 0))
        )
    elif cfg.weights == "pretrained":
        pipe = pretrained_pipeline(str(cfg.source), cfg.get("revision"), dtype)
    else:
        raise unknown_choice(
            "model weights", cfg.weights, ["pretrained", "random"], "model.weights"
        )
    return prepared_model(pipe, cfg, device, precision)


def prepared_model(pipe: Any, cfg: Any, device: str, precision: str) -> LoadedModel:
    """A pipeline (loaded here or handed in from Python) on the run's device and dtype, frozen,
    with the weight fingerprint every cache key starts from; ``cfg`` names its world and judges."""
    dtype = torch_dtype(precision)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    for component in COMPONENTS:
        getattr(pipe, component).requires_grad_(False).eval()
    return LoadedModel(
        name=str(cfg.name),
        world=str(cfg.world),
        pipe=pipe,
        resolution=int(cfg.resolution),
        judges=dict(cfg.get("judges") or {}),
        fingerprint=weights_fingerprint(pipe),
    )
