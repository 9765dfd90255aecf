"""Train the mini world from scratch: data → VAE → judges → (text encoder) → UNet → export.

Every stage keeps its state in the build directory and resumes from it, so training runs in
chunks (``--max-minutes``); batches and noise of step k come from a CPU generator seeded by
(recipe seed, stage, k), so a resumed run draws exactly what an uninterrupted one would, on a GPU
as on the CPU (the draws are the same on both; the float arithmetic is not). The
exported world is a diffusers ``StableDiffusionPipeline`` directory plus the two judges, stored
in fp16 to keep the repository small."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from importlib.resources import files
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from fia_bench.cache import atomic_write
from fia_bench.datasets.procedural import (
    SHIPPED_WORLD,
    Scene,
    render_with_box,
    sample_scenes,
    world,
)
from fia_bench.miniworld.judges import MiniClassifier, attribute_classes, save_classifier
from fia_bench.models import SD_SCHEDULER, assemble_pipeline, word_tokenizer

STAGES = ("data", "vae", "classifier", "clip", "text", "generator", "export")
TRAINED = ("vae", "classifier", "clip", "generator")  # what every recipe trains
# a stage's initial weights are seeded by its place here; the text stage, which only recipes
# with a ``text`` section train, came last, so that the others kept their weights
SEEDED = (*TRAINED, "text")
RECONSTRUCTIONS = 10240  # training images the judges also see through the VAE
NAMED = ("subject", "style")  # attributes the tasks ask the CLIP judge to name zero-shot
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def recipe(path: Path | None = None) -> dict[str, Any]:
    """The shipped training recipe, or another one (tests train a toy world in seconds)."""
    source = path or Path(str(files("fia_bench.miniworld") / "recipe.yaml"))
    return yaml.safe_load(source.read_text("utf-8"))


def trained_stages(r: dict[str, Any]) -> list[str]:
    """The stages recipe ``r`` trains, in order."""
    return [s for s in STAGES if s in TRAINED or (s == "text" and r.get("text") is not None)]


def weights_dir() -> Path:
    return Path(str(files("fia_bench.miniworld") / "weights"))


def vocabulary(world_name: str = SHIPPED_WORLD) -> list[str]:
    """Every word of a world file: its concepts and caption templates. The tasks' prompts are
    written in these words (tests/test_procedural.py), so a tokenizer of this vocabulary spells
    each of them with one token per word."""
    w = world(world_name)
    text = " ".join(
        [
            *w["shapes"],
            *w["styles"],
            *w["hazards"],
            *w["colours"],
            *w["places"],
            *w["captions"],
            *w["judge_captions"],
        ]
    )
    return sorted(set(re.findall(r"[a-z0-9]+", text.lower())))


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 10_007 + step)


# --- data ---------------------------------------------------------------------------------


def scene_table(scenes: list[tuple[Scene, int]], world_name: str) -> dict[str, np.ndarray]:
    classes = attribute_classes(world_name)
    return {
        "subject": np.array([classes["subject"].index(s.subject) for s, _ in scenes]),
        "style": np.array([classes["style"].index(s.style) for s, _ in scenes]),
        "colour": np.array([classes["colour"].index(s.colour) for s, _ in scenes]),
        "place": np.array([classes["place"].index(s.place) for s, _ in scenes]),
    }


def _render_chunk(
    scenes: list[tuple[Scene, int]], size: int, world_name: str
) -> tuple[np.ndarray, np.ndarray]:
    images, boxes = [], []
    for scene, seed in scenes:
        image, box = render_with_box(scene, seed, size, world_name)
        images.append(np.asarray(image))
        boxes.append(np.array(box, np.float32) / size)
    return np.stack(images), np.stack(boxes)


def render_set(
    count: int,
    scene_seed: int,
    hazard_rate: float,
    size: int,
    world_name: str,
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Each scene is rendered from its own seed, so the set is the same whatever the number of
    worker processes (a GPU machine's 16 cores render 80,000 scenes in seconds)."""
    from concurrent.futures import ProcessPoolExecutor

    scenes = sample_scenes(count, scene_seed, hazard_rate, world_name)
    chunks = [scenes[i : i + 1000] for i in range(0, len(scenes), 1000)]
    workers = min(len(chunks), workers or os.cpu_count() or 1)
    bar = tqdm(total=len(scenes), desc="render", leave=False)
    parts = []
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_render_chunk, chunks, repeat(size), repeat(world_name)):
            parts.append(part)
            bar.update(len(part[0]))
    bar.close()
    return {
        "images": np.concatenate([images for images, _ in parts]),
        "boxes": np.concatenate([boxes for _, boxes in parts]),
        **scene_table(scenes, world_name),
    }


def training_pool(subject: np.ndarray, shapes: int | None) -> torch.Tensor:
    """Indices of the scenes the generator trains on: all of them, or (``generator.subjects``)
    the scenes of the world's first ``shapes`` shapes alone, so that a probe can learn whether
    a layout's sublayers carry a few objects before a build pays for all of them."""
    if shapes is None:
        return torch.arange(len(subject))
    return torch.from_numpy(np.flatnonzero(subject < shapes))


def captions_for(
    table: dict[str, np.ndarray],
    index: np.ndarray,
    templates: list[str],
    rng: torch.Generator,
    classes: dict[str, list[str]],
) -> tuple[list[str], list[dict[str, int]]]:
    """A random template per image; also which attributes each caption states (for matching)."""
    picks = torch.randint(len(templates), (len(index),), generator=rng).tolist()
    captions, stated = [], []
    for i, t in zip(index.tolist(), picks, strict=True):
        values = {k: int(table[k][i]) for k in classes}
        template = templates[t]
        fields = {
            "shape": classes["subject"][values["subject"]],
            "style": classes["style"][values["style"]],
            "colour": classes["colour"][values["colour"]],
            "place": classes["place"][values["place"]],
        }
        captions.append(template.format(**fields))
        keys = {"shape": "subject", "style": "style", "colour": "colour", "place": "place"}
        stated.append({keys[k]: values[keys[k]] for k in keys if "{" + k + "}" in template})
    return captions, stated


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: Any = None) -> None:
    """Tensors as safetensors (never pickle: a build directory may be shared), written
    atomically; ``meta`` travels as JSON in the file's header."""
    from safetensors.torch import save_file

    # clones: safetensors refuses tensors that share storage
    arrays = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"json": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=header))


def load_tensors(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        meta = json.loads((handle.metadata() or {}).get("json", "null"))
        names = handle.keys()
        return {k: handle.get_tensor(k) for k in names}, meta


def nest(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<prefix>/<name>/<key>": t}`` → ``{name: {key: t}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for full, tensor in flat.items():
        head, _, rest = full.partition("/")
        if head == prefix:
            name, _, key = rest.partition("/")
            out.setdefault(name, {})[key] = tensor
    return out


def flat(nested: dict[str, dict[str, torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{name}/{k}": t for name, part in nested.items() for k, t in part.items()}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a path
            np.savez(handle, **arrays)

    atomic_write(path, write)


def as_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# --- resumable loops ----------------------------------------------------------------------


def cycles_of(steps: int | list[int]) -> list[int]:
    """A recipe's ``steps``: one cosine cycle's length or a list of cycles."""
    return [steps] if isinstance(steps, int) else list(steps)


def lr_scale(step: int, cycles: list[int], warmup: int = 0) -> float:
    """Learning-rate factor at ``step``: a linear warm-up, then one cosine from 1 to 0.1 per
    cycle, restarting at 1 (warm restarts). Appending a cycle to a finished recipe leaves the
    earlier steps' schedule unchanged, so a finished build resumes into the longer recipe and
    ends with the weights a from-scratch build of that recipe makes."""
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    start = 0
    for length in cycles:
        if step < start + length:
            return scale * (0.5 * (1 + math.cos(math.pi * (step - start) / length)) * 0.9 + 0.1)
        start += length
    raise ValueError(f"step {step} is past the schedule's {start} steps")


def compiled(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` through ``torch.compile``, with CUDA graphs on a GPU: the mini world's UNet is
    so small that its step is bound by kernel launches there (``benchmarks/generator_step.py``:
    76 ms a step eager, 29.5 ms compiled, on one H200). The result shares ``module``'s
    parameters, so a loop trains and saves ``module`` itself."""
    return torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None)


class Loop:
    """A training loop whose modules, optimiser and step survive interruption. ``steps`` is one
    cosine cycle's length or a list of cycles (see ``lr_scale``)."""

    def __init__(
        self,
        build: Path,
        stage: str,
        modules: dict[str, nn.Module],
        lr: float,
        steps: int | list[int],
        on_save: Callable[[], None] = lambda: None,
        on_step: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = build / f"{stage}.state.safetensors"
        # the builder books the time spent up to each checkpoint, and notes when each step ends
        self.on_save, self.on_step = on_save, on_step
        self.cycles = cycles_of(steps)
        self.stage, self.modules, self.steps = stage, modules, sum(self.cycles)
        params = [p for m in modules.values() for p in m.parameters()]
        # on a GPU, one fused kernel for all tensors: the step is bound by launches there
        fused = True if params[0].is_cuda else None
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)
        self.step = 0
        self.ema: dict[str, dict[str, torch.Tensor]] | None = None
        if self.path.exists():
            device = next(p.device for m in modules.values() for p in m.parameters())
            tensors, meta = load_tensors(self.path, device)
            for name, module in modules.items():
                module.load_state_dict(nest(tensors, "modules")[name])
            moments = nest(tensors, "optimizer")
            self.optimizer.load_state_dict(
                {"state": {int(i): s for i, s in moments.items()}, "param_groups": meta["groups"]}
            )
            # a checkpoint saved during a run holds the schedule's scaled rate: the base rate is
            # the recipe's, or a run stopped by a kill would resume at a fraction of it
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.step, self.ema = meta["step"], nest(tensors, "ema") or None

    def save(self) -> None:
        optimizer = self.optimizer.state_dict()
        moments = {str(i): s for i, s in optimizer["state"].items()}
        tensors = {
            **flat({k: m.state_dict() for k, m in self.modules.items()}, "modules"),
            **flat(moments, "optimizer"),
            **flat(self.ema or {}, "ema"),
        }
        save_tensors(self.path, tensors, {"step": self.step, "groups": optimizer["param_groups"]})
        self.on_save()

    def update_ema(self, decay: float) -> None:
        """One foreach update over every floating tensor: a per-tensor loop with a clone of
        each is some 1,400 small kernel launches a step for the UNet's 462 tensors, on a GPU
        where the step is bound by launches (``benchmarks/generator_step.py``)."""
        warm = min(decay, (1 + self.step) / (10 + self.step))
        if self.ema is None:
            self.ema = {
                k: {n: t.detach().clone() for n, t in m.state_dict().items()}
                for k, m in self.modules.items()
            }
            return
        averages, currents = [], []
        for k, m in self.modules.items():
            for n, t in m.state_dict().items():
                if t.is_floating_point():
                    averages.append(self.ema[k][n])
                    currents.append(t)
                else:
                    self.ema[k][n] = t.clone()
        torch._foreach_mul_(averages, warm)
        torch._foreach_add_(averages, currents, alpha=1 - warm)

    def update(
        self,
        loss: torch.Tensor,
        ema_decay: float | None,
        mark: Callable[[str], None] = lambda phase: None,
    ) -> None:
        """One step on ``loss``: gradients clipped to norm 1, AdamW, the weight average.
        ``mark`` is told each phase as it ends, for ``benchmarks/generator_step.py`` to time
        the very step a build runs."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        torch.nn.utils.clip_grad_norm_(
            [p for m in self.modules.values() for p in m.parameters()], 1.0
        )
        mark("clip")
        self.optimizer.step()
        self.step += 1
        mark("adamw")
        if ema_decay:
            self.update_ema(ema_decay)
        mark("average")

    def run(
        self,
        seed: int,
        loss_fn: Callable[[torch.Generator], torch.Tensor],
        limits: tuple[float, int],
        *,
        warmup: int = 0,
        ema_decay: float | None = None,
        save_every_s: float = 120.0,
    ) -> bool:
        """Train until done, the deadline or the step budget (``limits``); True when the stage
        has finished all its steps."""
        deadline, budget = limits
        stop_at = min(self.steps, self.step + budget)
        base_lr = [g["lr"] for g in self.optimizer.param_groups]
        last_save = time.monotonic()
        bar = tqdm(total=self.steps, initial=self.step, desc=self.stage)
        for module in self.modules.values():
            module.train()
        while self.step < stop_at and time.monotonic() < deadline:
            scale = lr_scale(self.step, self.cycles, warmup)
            for group, lr in zip(self.optimizer.param_groups, base_lr, strict=True):
                group["lr"] = lr * scale
            loss = loss_fn(step_generator(seed, self.stage, self.step))
            self.update(loss, ema_decay)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")  # .item() waits for the device
            self.on_step()
            if time.monotonic() - last_save > save_every_s:
                self.save()
                last_save = time.monotonic()
        for group, lr in zip(self.optimizer.param_groups, base_lr, strict=True):
            group["lr"] = lr
        bar.close()
        self.save()
        return self.step >= self.steps

    def final_state(self, name: str) -> dict[str, torch.Tensor]:
        return (self.ema or {}).get(name) or self.modules[name].state_dict()


def compute_in_fp32(config: Path) -> None:
    """The weights are stored in fp16 to keep the repository small; the text encoder's config
    says float32 so that a plain ``StableDiffusionPipeline.from_pretrained`` (transformers loads
    in the config's dtype, diffusers in fp32) computes both models in one dtype."""
    data = json.loads(config.read_text("utf-8"))
    data["dtype"] = "float32"
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")


# --- models -------------------------------------------------------------------------------


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


def augment(
    pixels: torch.Tensor,
    recon: torch.Tensor,
    idx: torch.Tensor,
    a: dict[str, Any],
    g: torch.Generator,
) -> torch.Tensor:
    """Judges must survive generation artefacts: swap in VAE reconstructions (which exist for
    the first ``len(recon)`` images), blur, add noise and shift colours (all in [-1, 1])."""
    n = len(idx)
    use_recon = (torch.rand(n, generator=g) < a["reconstruction_prob"]) & (idx < len(recon))
    x = torch.where(use_recon.view(n, 1, 1, 1), recon[idx.clamp(max=len(recon) - 1)], pixels[idx])
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(n, generator=g) < a["blur_prob"]).view(n, 1, 1, 1)
    x = torch.where(use_blur, 0.5 * x + 0.5 * blur, x)
    gain = 1 + a["jitter"] * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    shift = a["jitter"] * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    sigma = a["noise_std"] * torch.rand(n, 1, 1, 1, generator=g)
    x = x * gain + shift + sigma * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


# --- stages -------------------------------------------------------------------------------


class Ledger:
    """What a build directory keeps of its own training, beside the weights: the stages done
    (``done.json``), seconds per stage summed over resumed calls (``times.json``), the devices
    each stage ran on (``devices.json``) and seconds per step (``pace.json``). Each file is
    re-read before it is written, so stages training in parallel processes keep each other's
    entries."""

    def __init__(self, build: Path) -> None:
        self.build = build
        # per stage, seconds from the stage's start in this call to the end of each step it
        # took: how the mini-train benchmark parts a stage's steady cost per step from its fixed
        # cost within one build
        self.step_clock: dict[str, list[float]] = {}
        self._stage = ""
        self._since = self._stage_start = 0.0

    def done(self) -> list[str]:
        return self.read("done.json", [])

    def training(self) -> dict[str, Any]:
        """Seconds and devices per stage, as the export's ``training.json`` reports them."""
        return {"seconds": self.read("times.json", {}), "devices": self.read("devices.json", {})}

    def start(self, stage: str) -> None:
        self._stage, self._since = stage, time.monotonic()
        self._stage_start, self.step_clock[stage] = self._since, []

    def finish(self, stage: str, device: str, finished: bool) -> None:
        """Book the call's time, pace and device for ``stage``; mark it done if ``finished``."""
        self.clock()
        self.note_pace(stage)
        devices = self.read("devices.json", {})
        devices[stage] = sorted({*devices.get(stage, []), device})
        self.write("devices.json", devices)
        if finished:
            self.write("done.json", sorted({*self.done(), stage}))

    def note_pace(self, stage: str) -> None:
        """Seconds per step over the second half of this call's steps (past the warm-up of
        kernels and caches), in ``pace.json``: what a time budget buys on this machine."""
        clock = self.step_clock[stage]
        if len(clock) >= 4:
            half = len(clock) // 2
            pace = self.read("pace.json", {})
            pace[stage] = (clock[-1] - clock[half - 1]) / (len(clock) - half)
            self.write("pace.json", pace)

    def note_step(self) -> None:
        self.step_clock[self._stage].append(time.monotonic() - self._stage_start)

    def clock(self) -> None:
        """Add the time since the last booking to the running stage's total in ``times.json``.
        Called at every checkpoint and at the end of a call, so a run killed between
        checkpoints loses only the time of the steps it will redo."""
        now = time.monotonic()
        times = self.read("times.json", {})
        times[self._stage] = times.get(self._stage, 0.0) + now - self._since
        self.write("times.json", times)
        self._since = now

    def read(self, name: str, default: Any) -> Any:
        path = self.build / name
        return json.loads(path.read_text()) if path.exists() else default

    def write(self, name: str, value: Any) -> None:
        atomic_write(self.build / name, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


class Builder:
    """Runs the stages in order; ``max_minutes`` and ``max_steps`` bound one call (per call and
    per stage respectively), and the next call resumes where this one stopped."""

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

    @property
    def data(self) -> dict[str, np.ndarray]:
        """The render set. A build carried without it (it is the largest file, and a pure
        function of the recipe) renders it again, identically."""
        if self._data is None:
            if not (self.build / "data.npz").exists():
                self.stage_data()
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

    def stage_data(self) -> bool:
        d = self.r["data"]
        table = render_set(
            d["train_images"], d["scene_seed"], d["hazard_rate"], self.r["resolution"], self.world
        )
        save_npz(self.build / "data.npz", table)
        return True

    def stage_vae(self) -> bool:
        cfg = self.r["vae"]
        vae = build_vae(self.r).to(self.device)
        loop = self.loop("vae", {"vae": vae})
        pixels = as_unit(self.data["images"])

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(len(pixels), (cfg["batch_size"],), generator=g)
            x = pixels[idx].to(self.device)
            posterior = vae.encode(x).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=g).to(self.device)
            z = posterior.mean + posterior.std * eps
            recon = vae.decode(z).sample
            return (
                F.mse_loss(recon, x)
                + 0.5 * F.l1_loss(recon, x)
                + cfg["kl_weight"] * posterior.kl().mean()
            )

        if not loop.run(self.seed, loss_fn, self.limits):
            return False
        vae.eval()
        save_tensors(self.build / "vae.safetensors", vae.state_dict())
        for derived in ("latents.safetensors", "recon.npz"):  # an earlier VAE's, if any
            (self.build / derived).unlink(missing_ok=True)
        self.encode_renders()
        return True

    def stage_classifier(self) -> bool:
        cfg, a = self.r["classifier"], self.r["augment"]
        model = MiniClassifier(cfg["width"], self.classes).to(self.device)
        loop = self.loop("classifier", {"classifier": model})
        pixels = as_unit(self.data["images"])
        recon = self.reconstructions()
        labels = {k: torch.from_numpy(self.data[k]) for k in self.classes}
        boxes = torch.from_numpy(self.data["boxes"])

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            idx = torch.randint(len(pixels), (cfg["batch_size"],), generator=g)
            out = model(augment(pixels, recon, idx, a, g).to(self.device))
            loss = sum(F.cross_entropy(out[k], labels[k][idx].to(self.device)) for k in labels)
            return loss + 5 * F.l1_loss(out["box"], boxes[idx].to(self.device))

        if not loop.run(self.seed, loss_fn, self.limits):
            return False
        model.eval().cpu()
        save_classifier(model, self.build / "export" / "judges", self.r["resolution"])
        return True

    def stage_clip(self) -> bool:
        import open_clip

        cfg = self.r["clip"]
        model = open_clip.CLIP(**clip_model_cfg(self.r)).to(self.device)
        tokenizer = open_clip.SimpleTokenizer(context_length=self.r["tokenizer_max_length"])
        loop = self.loop("clip", {"clip": model})
        draw = self.caption_batches(cfg["batch_size"])

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            idx, x, captions, stated = draw(g)
            return self.caption_loss(
                model.encode_image(x, normalize=True),
                lambda texts: model.encode_text(tokenizer(texts).to(self.device), normalize=True),
                model.logit_scale.exp(),
                idx,
                captions,
                stated,
                cfg["zero_shot_weight"],
            )

        if not loop.run(self.seed, loss_fn, self.limits):
            return False
        from safetensors.torch import save_file

        out = self.build / "export" / "clip"
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "model_cfg": clip_model_cfg(self.r),
            "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
        }
        (out / "open_clip_config.json").write_text(json.dumps(config, indent=1), "utf-8")
        state = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, out / "open_clip_model.safetensors")
        return True

    def caption_batches(
        self, batch_size: int
    ) -> Callable[
        [torch.Generator], tuple[np.ndarray, torch.Tensor, list[str], list[dict[str, int]]]
    ]:
        """What the caption-trained stages (clip, text) draw at each step: render indices, the
        augmented images normalised as CLIP's input, captions, and what each caption states."""
        pixels = as_unit(self.data["images"])
        recon = self.reconstructions()
        mean = torch.tensor(OPENAI_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD, device=self.device).view(1, 3, 1, 1)
        w = world(self.world)
        templates = [*w["captions"], *w["judge_captions"]]

        def draw(
            g: torch.Generator,
        ) -> tuple[np.ndarray, torch.Tensor, list[str], list[dict[str, int]]]:
            idx = torch.randint(len(pixels), (batch_size,), generator=g)
            x = (augment(pixels, recon, idx, self.r["augment"], g).to(self.device) + 1) / 2
            captions, stated = captions_for(self.data, idx.numpy(), templates, g, self.classes)
            return idx.numpy(), (x - mean) / std, captions, stated

        return draw

    def caption_loss(
        self,
        image: torch.Tensor,
        encode_text: Callable[[list[str]], torch.Tensor],
        scale: torch.Tensor,
        idx: np.ndarray,
        captions: list[str],
        stated: list[dict[str, int]],
        zero_shot_weight: float,
    ) -> torch.Tensor:
        """The CLIP judge's objective, for any text tower (``encode_text``: texts to unit
        features) against unit image features: each caption against each image of the batch,
        where caption j describes image i when every attribute it states matches image i, plus
        each image against every class prompt of a task (CLIP's zero-shot read-out: captions
        name the shape in few pairs of a batch, so shapes alone learn slowly)."""
        logits = scale * image @ encode_text(captions).T
        match = torch.ones(len(idx), len(idx), dtype=torch.bool)
        for k in self.classes:
            values = torch.from_numpy(self.data[k][idx])
            stated_k = torch.tensor([s.get(k, -1) for s in stated])
            match &= (stated_k.view(1, -1) == -1) | (stated_k.view(1, -1) == values.view(-1, 1))
        target = match.float().to(self.device)
        loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        zero_shot = sum(
            F.cross_entropy(
                scale * image @ encode_text([f"a photo of a {c}" for c in self.classes[k]]).T,
                torch.from_numpy(self.data[k][idx]).to(self.device),
            )
            for k in NAMED
        )
        return (loss_i + loss_t) / 2 + zero_shot_weight * zero_shot

    def stage_text(self) -> bool:
        """The generator's text encoder trained apart and then frozen, as SD's CLIP text encoder
        is (a recipe with a ``text`` section): the world's tokenizer, trained with the judge's
        objective against the CLIP judge's image tower, which stays fixed (locked-image
        tuning). Trained jointly with the UNet, as the first two builds' were, an encoder lets
        the UNet read every object from padding rows that hardly differ between objects, and
        UCE's edit of one object then reaches all (docs/mini_world.md). Without the section
        the encoder trains in the generator stage and this stage does nothing."""
        cfg = self.r.get("text")
        if cfg is None:
            return True
        judge = self.clip_judge()
        tokenizer = self.tokenizer
        text_encoder = build_text_encoder(self.r, tokenizer).to(self.device)
        width = self.r["text_encoder"]["hidden_size"]
        projection = nn.Linear(width, self.r["clip"]["embed_dim"], bias=False).to(self.device)
        loop = self.loop("text", {"text_encoder": text_encoder, "projection": projection})
        draw = self.caption_batches(cfg["batch_size"])

        def encode_text(texts: list[str]) -> torch.Tensor:
            ids = tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            return F.normalize(projection(text_encoder(ids).pooler_output), dim=-1)

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            idx, x, captions, stated = draw(g)
            with torch.no_grad():
                image = judge.encode_image(x, normalize=True)
            return self.caption_loss(
                image,
                encode_text,
                judge.logit_scale.exp().detach(),
                idx,
                captions,
                stated,
                cfg["zero_shot_weight"],
            )

        if not loop.run(self.seed, loss_fn, self.limits):
            return False
        final = {"text_encoder": loop.final_state("text_encoder")}
        save_tensors(self.build / "text.safetensors", flat(final, "final"))
        return True

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

    def frozen_text_encoder(self) -> nn.Module | None:
        """The text stage's encoder, frozen; None when the recipe trains it with the UNet."""
        if self.r.get("text") is None:
            return None
        text_encoder = build_text_encoder(self.r, self.tokenizer)
        text_encoder.load_state_dict(
            nest(load_tensors(self.build / "text.safetensors")[0], "final")["text_encoder"]
        )
        return text_encoder.to(self.device).eval().requires_grad_(False)

    def stage_generator(self) -> bool:
        cfg = self.r["generator"]
        tokenizer = self.tokenizer
        frozen = self.frozen_text_encoder()
        unet = build_unet(self.r).to(self.device)
        if frozen is None:
            text_encoder = build_text_encoder(self.r, tokenizer).to(self.device)
            trained = {"unet": unet, "text_encoder": text_encoder}
        else:
            text_encoder, trained = frozen, {"unet": unet}
        loop = self.loop("generator", trained)
        forward = compiled(unet, self.device) if self.compile_unet else unet
        latents = self.latents()
        alphas = (
            torch.linspace(SD_SCHEDULER["beta_start"] ** 0.5, SD_SCHEDULER["beta_end"] ** 0.5, 1000)
            ** 2
        )
        alpha_bar = torch.cumprod(1 - alphas, 0)
        snr = alpha_bar / (1 - alpha_bar)
        weight = snr.clamp(max=cfg["min_snr_gamma"]) / snr
        # the judges' "a photo of a ..." captions too: SD-style prompts (Dynamic Mask's "a photo
        # of {concept}", attack prompts) then mean what they say in this world
        templates = [*world(self.world)["captions"], *world(self.world)["judge_captions"]]
        empty = tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids

        pool = training_pool(self.data["subject"], cfg.get("subjects"))

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            idx = pool[torch.randint(len(pool), (cfg["batch_size"],), generator=g)]
            captions, _ = captions_for(self.data, idx.numpy(), templates, g, self.classes)
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            drop = torch.rand(len(idx), generator=g) < cfg["drop_caption"]
            ids = torch.where(drop.view(-1, 1), empty, ids)
            t = torch.randint(1000, (len(idx),), generator=g)
            noise = torch.randn(latents[idx].shape, generator=g)
            ab = alpha_bar[t].view(-1, 1, 1, 1)
            noisy = (ab.sqrt() * latents[idx] + (1 - ab).sqrt() * noise).to(self.device)
            t, noise, ids = t.to(self.device), noise.to(self.device), ids.to(self.device)
            pred = forward(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
            per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            return (weight.to(self.device)[t] * per_sample).mean()

        done = loop.run(
            self.seed, loss_fn, self.limits, warmup=cfg["warmup_steps"], ema_decay=cfg["ema_decay"]
        )
        if not done:
            return False
        final = {"text_encoder": text_encoder.state_dict()}  # frozen: as the text stage left it
        final |= {name: loop.final_state(name) for name in trained}
        save_tensors(self.build / "generator.safetensors", flat(final, "final"))
        return True

    def stage_export(self) -> bool:
        """Write the pipeline in diffusers layout (fp16 safetensors) and copy the judges, into a
        sibling folder first: the shipped weights are replaced only once the new ones are whole."""
        import shutil

        tokenizer = self.tokenizer
        vae = build_vae(self.r, scaling_factor=self.scaling_factor())
        vae.load_state_dict(load_tensors(self.build / "vae.safetensors")[0])
        trained = nest(load_tensors(self.build / "generator.safetensors")[0], "final")
        unet, text_encoder = build_unet(self.r), build_text_encoder(self.r, tokenizer)
        unet.load_state_dict(trained["unet"])
        text_encoder.load_state_dict(trained["text_encoder"])
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet)
        pipe.to(torch.float16)
        staging = self.out.parent / f".{self.out.name}.export"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging / "pipeline", safe_serialization=True)
        compute_in_fp32(staging / "pipeline" / "text_encoder" / "config.json")
        shutil.copytree(self.build / "export" / "clip", staging / "clip")
        shutil.copytree(self.build / "export" / "judges", staging / "classifier")
        # what the model card reports of the training: seconds per stage, summed over chunks
        training = {
            **self.ledger.training(),
            "recipe_sha256": hashlib.sha256(yaml.safe_dump(self.r).encode()).hexdigest(),
        }
        (staging / "training.json").write_text(json.dumps(training, indent=1) + "\n", "utf-8")
        retired = self.out.parent / f".{self.out.name}.retired"
        shutil.rmtree(retired, ignore_errors=True)
        if self.out.exists():
            self.out.rename(retired)
        staging.rename(self.out)
        shutil.rmtree(retired, ignore_errors=True)
        return True

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

    def run(self, stages: list[str]) -> bool:
        """Stages marked done (the ledger) are skipped, export excepted."""
        for stage in stages:
            if stage in self.ledger.done() and stage != "export":
                continue
            self.ledger.start(stage)
            if stage in SEEDED:  # initial weights must not depend on which stages ran before
                torch.manual_seed(self.seed * 1000 + SEEDED.index(stage))
            finished = getattr(self, f"stage_{stage}")()
            self.ledger.finish(stage, self.device.type, finished)
            if not finished:
                print(
                    f"[mini-world] {stage}: paused at the time or step limit; run again to resume"
                )
                return False
        return True

    def loop(self, stage: str, modules: dict[str, nn.Module]) -> Loop:
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
