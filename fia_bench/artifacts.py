"""Erasure artifacts: the difference a method made to the base weights, stored compactly.

Methods edit the pipeline in place; the harness compares against a snapshot of the base weights,
keeps only the tensors that changed, and restores the base. A change that only zeroes entries
(FIA's neuron masking) is stored as a boolean mask, any other change as the new tensor. Applying
an artifact and restoring the base are exact, so one loaded model serves every method."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fia_bench.cache import atomic_write, hash_tensors
from fia_bench.models import COMPONENTS

ZERO = "zero:"
REPLACE = "replace:"


def named_tensors(pipe: Any) -> dict[str, torch.Tensor]:
    """Live parameters and buffers of the editable components, under component-prefixed names."""
    out: dict[str, torch.Tensor] = {}
    for component in COMPONENTS:
        module = getattr(pipe, component)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            out[f"{component}.{name}"] = tensor
    return out


def snapshot(pipe: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in named_tensors(pipe).items()}


@dataclass
class Delta:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def changed(self) -> list[str]:
        return sorted(key.split(":", 1)[1] for key in self.tensors)

    def digest(self) -> str:
        """Content hash; an empty delta hashes to the same value for every method."""
        return hash_tensors(sorted(self.tensors.items()))

    def changed_counts(self, base: dict[str, torch.Tensor]) -> dict[str, int]:
        """Number of entries each changed tensor differs in from the base."""
        counts: dict[str, int] = {}
        for key, t in self.tensors.items():
            kind, name = key.split(":", 1)
            if kind == ZERO.rstrip(":"):
                counts[name] = int((t & (base[name] != 0).cpu()).sum())
            else:
                counts[name] = int((t.to(base[name].device) != base[name]).sum())
        return counts

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous().cpu() for k, v in self.tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> Delta:
        from safetensors.torch import load_file

        return cls(tensors=load_file(str(path)))


def extract(pipe: Any, base: dict[str, torch.Tensor]) -> tuple[Delta, list[str]]:
    """Diff the pipeline against ``base``; return the delta and the names of non-finite tensors."""
    delta = Delta()
    non_finite: list[str] = []
    for name, live in named_tensors(pipe).items():
        old = base[name]
        if torch.equal(live, old):
            continue
        if live.is_floating_point() and not bool(torch.isfinite(live).all()):
            non_finite.append(name)
        changed = live != old
        if bool((live[changed] == 0).all()):
            delta.tensors[ZERO + name] = changed.cpu()
        else:
            delta.tensors[REPLACE + name] = live.detach().cpu().clone()
    return delta, non_finite


@torch.no_grad()
def apply(pipe: Any, delta: Delta) -> None:
    live = named_tensors(pipe)
    for key, t in delta.tensors.items():
        target = live[key.split(":", 1)[1]]
        if key.startswith(ZERO):
            target.masked_fill_(t.to(target.device), 0)
        else:
            target.copy_(t.to(target.device, target.dtype))


@torch.no_grad()
def restore(pipe: Any, base: dict[str, torch.Tensor], names: list[str] | None = None) -> None:
    """Put base values back; ``names`` limits it to the tensors a delta touched."""
    live = named_tensors(pipe)
    for name in live if names is None else names:
        live[name].copy_(base[name])


def sparsity(counts: dict[str, int], base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Changed entries against the changed tensors' size and against the whole UNet."""
    changed = sum(counts.values())
    touched = sum(base[name].numel() for name in counts)
    unet = sum(t.numel() for n, t in base.items() if n.startswith("unet."))
    return {
        "changed_entries": changed,
        "changed_fraction_of_touched": changed / touched if touched else 0.0,
        "changed_fraction_of_unet": changed / unet if unet else 0.0,
    }
