"""Judge networks shared by evaluators: each is loaded once per process, and image features are
memoised per image key, so CLIP accuracy and CLIP score on one image set embed each image once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fia_bench.cache import hash_tensors
from fia_bench.errors import FiaBenchError

# A CLIP small enough to build in code for tests; its weights come from a seed, not a download.
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(layers=2, width=32, patch_size=4, image_size=16, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)


@dataclass
class ClipBackbone:
    model: Any
    preprocess: Any
    tokenizer: Any
    fingerprint: str
    device: torch.device
    label: str  # what protocols print: where the judge came from and which weights it has
    _image_features: dict[str, torch.Tensor] = field(default_factory=dict)
    _text_features: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image], keys: list[str]) -> torch.Tensor:
        missing = [i for i, k in enumerate(keys) if k not in self._image_features]
        if missing:
            batch = torch.stack([self.preprocess(images[i].convert("RGB")) for i in missing])
            feats = self.model.encode_image(batch.to(self.device), normalize=True).float().cpu()
            self._image_features.update({keys[i]: f for i, f in zip(missing, feats, strict=True)})
        return torch.stack([self._image_features[k] for k in keys])

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_features]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            feats = self.model.encode_text(tokens, normalize=True).float().cpu()
            self._text_features.update(zip(missing, feats, strict=True))
        return torch.stack([self._text_features[t] for t in texts])


_LOADED: dict[tuple, ClipBackbone] = {}


def load_clip(spec: dict[str, Any], device: str) -> ClipBackbone:
    """``spec`` is ``{arch: tiny_random, seed}``, ``{arch: <open_clip name>, pretrained}`` or
    ``{arch: local-dir:<folder>}`` (open_clip's own layout: the mini world's CLIP)."""
    import open_clip

    key = (tuple(sorted((k, str(v)) for k, v in spec.items())), device)
    if key in _LOADED:
        return _LOADED[key]
    arch = str(spec.get("arch", ""))
    if arch == "tiny_random":
        torch.manual_seed(int(spec.get("seed", 0)))
        model = open_clip.CLIP(**TINY_CLIP)
        preprocess = open_clip.image_transform(
            TINY_CLIP["vision_cfg"]["image_size"], is_train=False
        )
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
    elif arch in open_clip.list_models() or arch.startswith("local-dir:"):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=spec.get("pretrained")
            )
        except (RuntimeError, OSError) as err:
            raise FiaBenchError(
                f"cannot load open_clip {arch}/{spec.get('pretrained')}: {str(err).splitlines()[0]}"
            ) from err
        tokenizer = open_clip.get_tokenizer(arch)
    else:
        raise FiaBenchError(
            f"unknown CLIP judge arch '{arch}'; use tiny_random, local-dir:<folder> or one of "
            "open_clip.list_models()"
        )
    model.eval().to(device)
    fingerprint = hash_tensors(sorted(model.state_dict().items()))
    label = judge_label(spec, fingerprint)
    _LOADED[key] = ClipBackbone(
        model, preprocess, tokenizer, fingerprint, torch.device(device), label
    )
    return _LOADED[key]


def judge_label(spec: dict[str, Any], fingerprint: str) -> str:
    """Reports name a judge by its source and its weights' hash, so that reports measured with
    different weights of one judge (a retrained mini world) say so."""
    arch = str(spec.get("arch", ""))
    if arch == "tiny_random":
        source = f"tiny_random seed {spec.get('seed', 0)}"
    elif arch.startswith("local-dir:"):
        folder = Path(arch.removeprefix("local-dir:")).resolve()
        here = Path.cwd()
        source = f"local-dir:{folder.relative_to(here) if folder.is_relative_to(here) else folder}"
    else:
        source = f"{arch}/{spec['pretrained']}" if spec.get("pretrained") else arch
    return f"{source} (weights {fingerprint[:12]})"
