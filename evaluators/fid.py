"""Fréchet distance between the features of a method's images and of a reference set.

Features come from clean-fid's Inception in "clean" mode (PIL bicubic resize to 299, the paper
protocol: baselines_evaluators.md §4) or from the world's CLIP judge (the mini and tiny worlds,
whose images Inception was never trained on). The reference is either the unedited model's images
for the same prompts and seeds ("FID vs SD") or a folder of images (COCO val2014), whose features
are computed once and cached. The same features also go through torchmetrics'
FrechetInceptionDistance as a cross-check (``fid_torchmetrics``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fia_bench.api import Evaluator, Score
from fia_bench.backbones import load_clip
from fia_bench.cache import Cache, Damaged, atomic_write, hash_tensors, stable_hash, write_text
from fia_bench.downloads import download, sha256_of
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.miniworld.judges import load_classifier, to_pixels
from fia_bench.schema import Choice, Int, Schema, Text

FEATURES = ("inception", "clip", "classifier")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)


def inception_weights(cache: Cache | None, expected: str | None) -> Path:
    """clean-fid's TorchScript Inception, in this user's cache (never the shared temp folder) and
    checked by sha256 before it is loaded: against ``expected`` when the config pins it, else
    against the digest recorded when this cache downloaded it. A mismatch is refused: a
    TorchScript file is code."""
    if cache is None:
        raise FiaBenchError("FID with Inception features needs the harness cache")
    path = cache.root / "downloads" / "clean-fid" / Path(INCEPTION_URL).name
    record = path.with_name(path.name + ".sha256")
    setting = "evaluator.fid.settings.features=clip"
    if not path.exists():
        download("clean-fid's Inception weights", INCEPTION_URL, path, setting)
        write_text(record, sha256_of(path) + "\n")
    if not expected and not record.exists():
        raise FiaBenchError(
            f"{path} has no recorded sha256: delete it to download it again, or pin the "
            "digest you trust with evaluator.fid.settings.inception_sha256"
        )
    expected = expected or record.read_text(encoding="utf-8").strip()
    actual = sha256_of(path)
    if actual != expected:
        raise FiaBenchError(
            f"{path} has sha256 {actual[:12]}…, expected {expected[:12]}…: refusing to load it; "
            "delete it to download it again"
        )
    return path


class FeatureNet(torch.nn.Module):
    """uint8 NCHW images → feature vectors; one network for clean-fid and torchmetrics alike."""

    def __init__(
        self,
        kind: str,
        judges: dict[str, Any],
        device: str,
        cache: Cache | None = None,
        inception_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.device = torch.device(device)
        if kind == "clip":
            self.backbone = load_clip(judges["clip"], device)
            self.num_features = int(self.backbone.model.visual.output_dim)
            self.fingerprint = self.backbone.fingerprint
        elif kind == "classifier":
            if "classifier" not in judges:
                raise FiaBenchError(
                    "evaluator.fid.settings.features=classifier needs a world with a classifier "
                    "judge (model=mini); use clip or inception"
                )
            self.classifier, self.resolution, self.fingerprint = load_classifier(
                str(judges["classifier"]["path"])
            )
            self.num_features = self.classifier.num_features
        else:
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer

            weights = inception_weights(cache, inception_sha256)
            # clean-fid's own loader would take whatever file sits in the shared /tmp
            self.inception = InceptionV3W(str(weights.parent), download=False).to(self.device)
            self.inception.eval()
            self.resize = build_resizer("clean")
            self.num_features = 2048
            self.fingerprint = "clean-fid torchscript inception-2015-12-05, clean mode"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        arrays = [image.permute(1, 2, 0).cpu().numpy() for image in images]
        if self.kind == "clip":
            pil = [Image.fromarray(a) for a in arrays]
            keys = [hashlib.sha256(a.tobytes()).hexdigest() for a in arrays]
            return self.backbone.image_features(pil, keys).double()
        if self.kind == "classifier":
            pil = [Image.fromarray(a) for a in arrays]
            return self.classifier.features(to_pixels(pil, self.resolution)).double()
        resized = np.stack([self.resize(a) for a in arrays]).transpose(0, 3, 1, 2)
        batch = torch.from_numpy(resized).float().to(self.device)
        return self.inception(batch).double().cpu()


def as_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(
        0, 3, 1, 2
    )


def frechet(features: torch.Tensor, reference: torch.Tensor) -> float:
    """clean-fid's Fréchet distance between the Gaussian fits of two feature sets."""
    from cleanfid.fid import frechet_distance

    a, b = features.numpy(), reference.numpy()
    return float(
        frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    )


def torchmetrics_fid(features: torch.Tensor, reference: torch.Tensor) -> float:
    """torchmetrics' own statistics and distance on the same features (an independent check)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = features.shape[1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    metric = FrechetInceptionDistance(feature=Identity(), reset_real_features=False)
    metric.set_dtype(torch.float64)
    metric.update(reference, real=True)
    metric.update(features, real=False)
    return float(metric.compute())


class FID(Evaluator):
    SETTINGS: ClassVar[Schema] = Schema(
        features=Choice(*FEATURES),
        reference=Text(),
        batch_size=Int(ge=1),
        inception_sha256=Text(null=True),
    )
    higher_is_better: ClassVar[dict[str, bool]] = {"fid": False, "fid_torchmetrics": False}
    set_level_metrics: ClassVar[frozenset[str]] = frozenset(higher_is_better)
    version: ClassVar[str] = "1"

    def __post_init__(self) -> None:
        kind = str(self.settings.get("features", "clip"))
        if kind not in FEATURES:
            raise unknown_choice("FID features", kind, FEATURES, "evaluator.fid.settings.features")
        self.reference = str(self.settings.get("reference", "base"))
        if self.reference != "base" and not Path(self.reference).expanduser().is_dir():
            raise FiaBenchError(
                f"evaluator.fid.settings.reference={self.reference}: give 'base' "
                "or an existing folder of reference images"
            )
        self.net = FeatureNet(
            kind,
            self.context.judges,
            self.context.device,
            self.context.cache,
            self.settings.get("inception_sha256"),
        )
        self.batch_size = int(self.settings.get("batch_size", 64))
        self.reset()

    def fingerprint(self) -> dict[str, Any]:
        reference = self.reference if self.reference == "base" else self.folder_listing()
        return {"features": self.net.fingerprint, "reference": reference}

    def protocol(self) -> str:
        return f"FID {self.net.kind} features vs {self.reference}"

    def reset(self) -> None:
        self._features: list[torch.Tensor] = []
        self._rows: list[pd.DataFrame] = []

    def update(self, images: list[Image.Image], rows: pd.DataFrame) -> None:
        self._features.append(self.net(as_uint8(images)))
        self._rows.append(rows)

    def compute(self) -> list[Score]:
        features = torch.cat(self._features)
        reference = self.reference_features(pd.concat(self._rows))
        return [
            Score("*", "fid", frechet(features, reference)),
            Score("*", "fid_torchmetrics", torchmetrics_fid(features, reference)),
        ]

    def features_of(self, images: list[Image.Image]) -> torch.Tensor:
        batches = range(0, len(images), self.batch_size)
        return torch.cat([self.net(as_uint8(images[i : i + self.batch_size])) for i in batches])

    def reference_features(self, rows: pd.DataFrame) -> torch.Tensor:
        if self.reference == "base":
            images = self.context.base_images(list(rows["prompt"]), list(rows["generation_seed"]))
            return self.features_of(images)
        return self.folder_features()

    def folder_listing(self) -> list[tuple[str, int]]:
        folder = Path(self.reference).expanduser()
        return [
            (p.name, p.stat().st_size)
            for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]

    def folder_features(self) -> torch.Tensor:
        """Features of a reference folder, computed once per (listing, feature net) and cached."""
        from safetensors.torch import save_file

        listing = self.folder_listing()
        if not listing:
            raise FiaBenchError(
                f"reference folder {self.reference} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        key = stable_hash({"listing": listing, "features": self.net.fingerprint})
        if self.context.cache is None:
            raise FiaBenchError("FID against a folder needs the harness cache")
        path = self.context.cache.path("fid_reference", key, ".safetensors")
        if path.exists():
            try:
                return verified_features(path)
            except Damaged as err:
                self.context.cache.set_aside([path], str(err))
        folder = Path(self.reference).expanduser()
        features = self.features_of([Image.open(folder / name) for name, _ in listing]).contiguous()
        digest = hash_tensors([("features", features)])
        atomic_write(
            path, lambda tmp: save_file({"features": features}, str(tmp), {"sha256": digest})
        )
        return features


def verified_features(path: Path) -> torch.Tensor:
    """Cached reference features, re-hashed against the digest stored with them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            features, digest = f.get_tensor("features"), (f.metadata() or {}).get("sha256")
    except Exception as err:  # safetensors raises its own error types for a bad file
        raise Damaged(f"features unreadable ({type(err).__name__})") from err
    if hash_tensors([("features", features)]) != digest:
        raise Damaged("features do not match their recorded sha256")
    return features
