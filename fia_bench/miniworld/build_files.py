"""What a mini-world build directory holds and how it is read and written: the recipe, the
stages it trains, tensors as safetensors (never pickle: a build directory may be shared) and
arrays as npz, written atomically, and the ledger of the build's own training."""

from __future__ import annotations

import json
import re
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fia_bench.cache import atomic_write
from fia_bench.datasets.procedural import SHIPPED_WORLD, world

STAGES = ("data", "vae", "classifier", "clip", "text", "generator", "export")
TRAINED = ("vae", "classifier", "clip", "generator")  # what every recipe trains
# a stage's initial weights are seeded by its place here; the text stage, which only recipes
# with a ``text`` section train, came last, so that the others kept their weights
SEEDED = (*TRAINED, "text")


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
