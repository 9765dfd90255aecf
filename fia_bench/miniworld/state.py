"""One build directory as the stages see it: its recipe and limits, the render set and what the
trained stages left there (latents, reconstructions, the CLIP judge, the frozen text encoder),
each read or derived on demand, so a build carried with only some of its files resumes."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fia_bench.miniworld.build_files import (
    Ledger,
    as_unit,
    load_tensors,
    nest,
    recipe,
    save_npz,
    save_tensors,
    vocabulary,
    weights_dir,
)
from fia_bench.miniworld.judges import attribute_classes
from fia_bench.miniworld.loop import Loop
from fia_bench.miniworld.nets import build_text_encoder, build_unet, build_vae, clip_model_cfg
from fia_bench.miniworld.renders import RECONSTRUCTIONS, render_set
from fia_bench.models import assemble_pipeline, word_tokenizer


class BuildState:
    """``max_minutes`` and ``max_steps`` bound one call (per call and per stage respectively);
    the next call resumes where this one stopped."""

    def __init__(
        self,
        build: Path,
        *,
        out: Path | None = None,
        recipe_path: Path | None = None,
        max_minutes: float = float("inf"),
        max_steps: int = 2**62,
        device: str = "cpu",
        compile_unet: bool = False,
    ) -> None:
        self.build = build
        self.device = torch.device(device)
        self.compile_unet = compile_unet
        if self.device.type == "cuda":  # TF32 matrix products: the tiny models' steps are short
            torch.backends.cuda.matmul.allow_tf32 = True
        self.out = out or weights_dir()
        self.r = recipe(recipe_path)
        self.world = str(self.r["world"])
        self.classes = attribute_classes(self.world)
        self.seed = int(self.r["seed"])
        self.limits = (time.monotonic() + 60 * max_minutes, max_steps)
        build.mkdir(parents=True, exist_ok=True)
        self._data: dict[str, np.ndarray] | None = None
        self.ledger = Ledger(build)

    def render_data(self) -> None:
        d = self.r["data"]
        table = render_set(
            d["train_images"], d["scene_seed"], d["hazard_rate"], self.r["resolution"], self.world
        )
        save_npz(self.build / "data.npz", table)

    @property
    def data(self) -> dict[str, np.ndarray]:
        """The render set. A build carried without it (it is the largest file, and a pure
        function of the recipe) renders it again, identically."""
        if self._data is None:
            if not (self.build / "data.npz").exists():
                self.render_data()
            self._data = dict(np.load(self.build / "data.npz"))
        return self._data

    def latents(self) -> torch.Tensor:
        """The render set's latents, scaled to unit variance."""
        self.encode_renders()
        return load_tensors(self.build / "latents.safetensors")[0]["latents"]

    def scaling_factor(self) -> float:
        """The latents' scaling factor, read from their file's header alone."""
        from safetensors import safe_open

        self.encode_renders()
        with safe_open(str(self.build / "latents.safetensors"), framework="pt") as handle:
            return float(json.loads(handle.metadata()["json"])["scaling_factor"])

    def reconstructions(self) -> torch.Tensor:
        """VAE reconstructions of the first ``RECONSTRUCTIONS`` renders, in [-1, 1]."""
        self.encode_renders()
        return as_unit(np.load(self.build / "recon.npz")["images"])

    def encode_renders(self) -> None:
        """Encode the render set with the trained VAE (``vae.safetensors``), unless that was
        done: a build carried with its VAE weights alone encodes them again."""
        if (self.build / "latents.safetensors").exists() and (self.build / "recon.npz").exists():
            return
        vae = build_vae(self.r).to(self.device)
        vae.load_state_dict(load_tensors(self.build / "vae.safetensors")[0])
        vae.eval()
        pixels = as_unit(self.data["images"])
        latents, recons = [], []
        with torch.no_grad():
            for start in tqdm(range(0, len(pixels), 512), desc="encode", leave=False):
                z = vae.encode(pixels[start : start + 512].to(self.device)).latent_dist.mean
                latents.append(z.cpu())
                if start < RECONSTRUCTIONS:
                    decoded = vae.decode(z).sample.clamp(-1, 1).cpu()
                    recons.append(((decoded + 1) * 127.5).round().to(torch.uint8))
        latents_t = torch.cat(latents)
        scaling = float(1 / latents_t.std())
        save_tensors(
            self.build / "latents.safetensors",
            {"latents": latents_t * scaling},
            {"scaling_factor": scaling},
        )
        recon = torch.cat(recons).permute(0, 2, 3, 1).numpy()
        save_npz(self.build / "recon.npz", {"images": recon})

    def clip_judge(self) -> nn.Module:
        """The CLIP judge as the clip stage exported it, frozen."""
        import open_clip

        model = open_clip.CLIP(**clip_model_cfg(self.r))
        state = load_tensors(self.build / "export" / "clip" / "open_clip_model.safetensors")[0]
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.to(self.device).eval().requires_grad_(False)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The world's word tokenizer, which the generator's text encoder reads: one per build,
        which the text, generator and export stages share."""
        return word_tokenizer(vocabulary(self.world), self.r["tokenizer_max_length"])

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """``texts`` in the world's tokens, padded to the tokenizer's length, as SD pads its
        prompts: on the CPU, where the stages draw their batches."""
        tokenizer = self.tokenizer
        return tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def frozen_text_encoder(self) -> nn.Module | None:
        """The text stage's encoder, frozen; None when the recipe trains it with the UNet."""
        if self.r.get("text") is None:
            return None
        text_encoder = build_text_encoder(self.r, self.tokenizer)
        text_encoder.load_state_dict(
            nest(load_tensors(self.build / "text.safetensors")[0], "final")["text_encoder"]
        )
        return text_encoder.to(self.device).eval().requires_grad_(False)

    def current_pipeline(self) -> Any:
        """The pipeline as the build stands: the VAE, and the generator's latest checkpoint
        (its EMA weights, as the export would take them), to measure an early generator."""
        tokenizer = self.tokenizer
        vae = build_vae(self.r, scaling_factor=self.scaling_factor())
        vae.load_state_dict(load_tensors(self.build / "vae.safetensors")[0])
        unet = build_unet(self.r)
        tensors, meta = load_tensors(self.build / "generator.state.safetensors")
        state = nest(tensors, "ema") or nest(tensors, "modules")
        unet.load_state_dict(state["unet"])
        text_encoder = self.frozen_text_encoder()
        if text_encoder is None:
            text_encoder = build_text_encoder(self.r, tokenizer)
            text_encoder.load_state_dict(state["text_encoder"])
        print(f"[mini-world] generator at step {meta['step']}")
        return assemble_pipeline(vae, text_encoder, tokenizer, unet).to(torch.float32)

    def loop(self, stage: str, modules: dict[str, nn.Module]) -> Loop:
        """The stage's resumable loop at its recipe's rate and steps, booking into the ledger."""
        cfg = self.r[stage]
        return Loop(
            self.build,
            stage,
            modules,
            cfg["lr"],
            cfg["steps"],
            self.ledger.clock,
            self.ledger.note_step,
        )
