"""An erased model made elsewhere, evaluated against the base like any method: its weights are
loaded into the base pipeline, so the harness diffs, caches and reports them as an edit and its
runs merge with every other run of the same base model.

Accepted ``path``: a diffusers pipeline folder (each component's ``*.safetensors``), a UNet
``.safetensors`` file, an ESD/UCE-style ``.pt`` state dict (read with ``weights_only=True``, so
a checkpoint cannot run code), or a diffusers LoRA (a ``.safetensors`` file, or a folder holding
``pytorch_lora_weights.safetensors``) merged into the weights. State-dict keys are diffusers
names, bare (the UNet's) or prefixed with the component (``unet.``, ``text_encoder.``, ``vae.``).
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from fia_bench.api import EraseRequest, Method
from fia_bench.errors import FiaBenchError
from fia_bench.models import COMPONENTS
from fia_bench.schema import Real, Schema, Text

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# diffusers LoRA keys: peft style (lora_A / lora_B, what save_lora_weights writes) and the older
# LoRACompatibleLinear style (lora.down / lora.up)
LORA_KEY = re.compile(r"^(?P<target>.+?)\.(?:lora_(?P<peft>[AB])|lora\.(?P<old>down|up))\.weight$")


def file_sha256(paths: list[Path], root: Path) -> str:
    """sha256 of one file, or of a folder's loaded files (relative name, then bytes, in order);
    read once per process while the files keep their size and modification time."""
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _sha256(stats, str(root))


@functools.lru_cache(maxsize=16)
def _sha256(stats: tuple[tuple[str, int, int], ...], root: str) -> str:
    paths = [Path(s[0]) for s in stats]
    digest = hashlib.sha256()
    for path in paths:
        if len(paths) > 1:
            digest.update(path.relative_to(Path(root)).as_posix().encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def split_components(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Component → its keys; unprefixed keys belong to the UNet (ESD's and UCE's files)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component in COMPONENTS and rest:
            out.setdefault(component, {})[rest] = tensor
        else:
            out.setdefault("unet", {})[key] = tensor
    return out


class Checkpoint(Method):
    SETTINGS = Schema(path=Text(null=True), lora_scale=Real())

    def __init__(self, path: str | None = None, lora_scale: float = 1.0) -> None:
        if not path:
            raise FiaBenchError(
                "method=checkpoint needs method.settings.path=<a diffusers pipeline folder, a "
                "UNet .safetensors, a .pt state dict or a diffusers LoRA>"
            )
        self.path = Path(str(path)).expanduser()
        if not self.path.exists():
            raise FiaBenchError(f"method.settings.path={path}: no such file or folder")
        self.lora_scale = float(lora_scale)

    @classmethod
    def input_fingerprint(cls, settings: dict[str, Any]) -> dict[str, Any]:
        checkpoint = cls(**settings)
        _, files = checkpoint.kind()
        return {"sha256": file_sha256(files, checkpoint.path)}

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        pipe = request.engine.pipe
        kind, files = self.kind()
        if kind == "lora":
            from safetensors.torch import load_file

            changed = self.merge_lora(pipe, load_file(str(files[0])))
        elif kind == "pipeline":
            from safetensors.torch import load_file

            by_component: dict[str, dict[str, torch.Tensor]] = {}
            for path in files:  # a component may be sharded over several files
                by_component.setdefault(path.parent.name, {}).update(load_file(str(path)))
            changed = self.load(pipe, by_component)
        elif kind == "safetensors":
            from safetensors.torch import load_file

            changed = self.load(pipe, split_components(load_file(str(files[0]))))
        else:
            try:
                state = torch.load(files[0], map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError) as err:
                raise FiaBenchError(
                    f"method.settings.path={self.path}: torch.load(weights_only=True) refuses "
                    f"it ({str(err).splitlines()[0]}); save a plain state dict of tensors"
                ) from err
            if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()
            ):
                raise FiaBenchError(
                    f"method.settings.path={self.path}: not a state dict of tensors "
                    "(name → tensor, as torch.save(unet.state_dict()) writes)"
                )
            changed = self.load(pipe, split_components(state))
        return {
            "path": str(self.path),
            "kind": kind,
            "sha256": file_sha256(files, self.path),
            "tensors_loaded": changed,
        }

    def kind(self) -> tuple[str, list[Path]]:
        path = self.path
        if path.is_dir():
            if (path / LORA_FILE).is_file():
                return "lora", [path / LORA_FILE]
            files = sorted(
                f
                for c in COMPONENTS
                if (path / c).is_dir()
                for f in (path / c).glob("*.safetensors")
            )
            if not files:
                raise FiaBenchError(
                    f"method.settings.path={path}: a folder needs {LORA_FILE} (a LoRA) or "
                    f"<component>/*.safetensors for {', '.join(COMPONENTS)} (a diffusers pipeline)"
                )
            return "pipeline", files
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
            return ("lora" if any(LORA_KEY.match(k) for k in keys) else "safetensors"), [path]
        if path.suffix in STATE_DICT_SUFFIXES:
            return "state_dict", [path]
        raise FiaBenchError(
            f"method.settings.path={path}: unknown kind of file '{path.suffix}'; give a "
            f"folder, a .safetensors file or a state dict ({', '.join(STATE_DICT_SUFFIXES)})"
        )

    def load(self, pipe: Any, by_component: dict[str, dict[str, torch.Tensor]]) -> int:
        """Copy every tensor into the live weights of its component; refuse before writing
        anything when a name or a shape does not fit."""
        plan = []
        for component, state in by_component.items():
            target = getattr(pipe, component).state_dict()
            unknown = sorted(k for k in state if k not in target)
            if unknown:
                raise FiaBenchError(
                    f"method.settings.path={self.path}: {len(unknown)} key(s) match no {component} "
                    f"weight (first: '{unknown[0]}'); expected diffusers names such as "
                    f"'{next(iter(target))}'"
                )
            for key, tensor in state.items():
                if tuple(tensor.shape) != tuple(target[key].shape):
                    raise FiaBenchError(
                        f"method.settings.path={self.path}: {component}.{key} has shape "
                        f"{tuple(tensor.shape)}, the model's is {tuple(target[key].shape)}"
                    )
                plan.append((target[key], tensor))
        with torch.no_grad():
            for live, tensor in plan:
                live.copy_(tensor.to(device=live.device, dtype=live.dtype))
        return len(plan)

    def merge_lora(self, pipe: Any, state: dict[str, torch.Tensor]) -> int:
        """W += lora_scale · (alpha / rank) · up @ down for every LoRA pair (alpha = rank when
        the file stores none, as peft saves it)."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            if key.endswith(".alpha"):
                continue
            match = LORA_KEY.match(key)
            if match is None:
                raise FiaBenchError(
                    f"method.settings.path={self.path}: '{key}' is not a LoRA weight "
                    "(expected <module>.lora_A.weight / lora_B.weight or lora.down / lora.up)"
                )
            side = match["peft"] or match["old"]
            role = "down" if side in ("A", "down") else "up"
            pairs.setdefault(match["target"], {})[role] = tensor
        weights = {}
        for target, pair in pairs.items():
            component, _, module = target.partition(".")
            if component not in COMPONENTS:
                component, module = "unet", target
            live = getattr(pipe, component).state_dict().get(f"{module}.weight")
            if live is None or set(pair) != {"down", "up"}:
                raise FiaBenchError(
                    f"method.settings.path={self.path}: LoRA target '{target}' is not a "
                    f"{component} Linear weight, or lacks its down/up pair"
                )
            down, up = pair["down"].float(), pair["up"].float()
            alpha = state.get(f"{target}.alpha")
            scale = self.lora_scale * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
            update = scale * (up.flatten(1) @ down.flatten(1)).reshape(live.shape)
            weights[(component, f"{module}.weight")] = live.float() + update
        by_component: dict[str, dict[str, torch.Tensor]] = {}
        for (component, key), tensor in weights.items():
            by_component.setdefault(component, {})[key] = tensor
        return self.load(pipe, by_component)
