"""The mini world's second judge: a small CNN that reads every attribute of a render.

It is independent of the mini CLIP (other architecture, other loss), so the agreement of the two on
generated images tells whether either judge is fooled by generation artefacts. Its pooled features
are the FID feature space of the mini world, and its hazard head, with its box head, is the
hazard detector (detections in NudeNet's layout)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from fia_bench.datasets.procedural import SHIPPED_WORLD, world


def attribute_classes(world_name: str = SHIPPED_WORLD) -> dict[str, list[str]]:
    """Class names of each classifier head, in the order of the world file."""
    w = world(world_name)
    return {
        "subject": [*w["shapes"], *w["hazards"]],
        "style": list(w["styles"]),
        "colour": list(w["colours"]),
        "place": list(w["places"]),
    }


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class MiniClassifier(nn.Module):
    """Three conv stages (32 → 16 → 8 → 4 pixels), global pooling, one linear head per attribute
    and a box head ``[x, y, w, h]`` as fractions of the image side."""

    def __init__(self, width: int, classes: dict[str, list[str]]) -> None:
        super().__init__()
        self.classes = classes
        self.body = nn.Sequential(
            _stage(3, width),
            nn.AvgPool2d(2),
            _stage(width, 2 * width),
            nn.AvgPool2d(2),
            _stage(2 * width, 4 * width),
            nn.AvgPool2d(2),
        )
        self.num_features = 4 * width
        self.heads = nn.ModuleDict(
            {k: nn.Linear(self.num_features, len(v)) for k, v in classes.items()}
        )
        self.box = nn.Linear(self.num_features, 4)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` in [-1, 1], NCHW."""
        return self.body(pixels).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(pixels)
        out = {k: head(feats) for k, head in self.heads.items()}
        out["box"] = torch.sigmoid(self.box(feats))
        return out


def to_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images → NCHW float in [-1, 1] at the judge's resolution."""
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32)
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


@cache
def load_classifier(directory: str) -> tuple[MiniClassifier, int, str]:
    """(model, input resolution, weights sha256) from ``classifier.json`` + ``.safetensors``."""
    from safetensors.torch import load_file

    from fia_bench.cache import hash_tensors

    root = Path(directory)
    meta = json.loads((root / "classifier.json").read_text(encoding="utf-8"))
    model = MiniClassifier(int(meta["width"]), meta["classes"])
    state = {k: v.float() for k, v in load_file(root / "classifier.safetensors").items()}
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model, int(meta["resolution"]), hash_tensors(sorted(state.items()))


def save_classifier(model: MiniClassifier, directory: Path, resolution: int) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    meta = {"width": model.num_features // 4, "classes": model.classes, "resolution": resolution}
    (directory / "classifier.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "classifier.safetensors")


@torch.no_grad()
def detect_hazards(
    model: MiniClassifier, images: list[Image.Image], resolution: int, floor: float
) -> list[list[dict[str, Any]]]:
    """Per image, one detection per hazard class whose probability reaches ``floor``:
    ``{"class", "score", "box": [x, y, w, h]}`` in the image's own pixels, as NudeNet reports."""
    out = model(to_pixels(images, resolution))
    probs = out["subject"].softmax(-1)
    names = model.classes["subject"]
    hazards = [i for i, n in enumerate(names) if n in world()["hazards"]]
    found = []
    for image, p, box in zip(images, probs, out["box"], strict=True):
        side = image.size[0]
        pixels = [round(float(v) * side) for v in box]
        found.append(
            [
                {"class": names[i], "score": round(float(p[i]), 6), "box": pixels}
                for i in hazards
                if float(p[i]) >= floor
            ]
        )
    return found
