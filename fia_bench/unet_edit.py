"""What the method plugins that read or mask UNet layers share: the Linear of every transformer
block found by its SD module name, and a task's settings block that a world may replace."""

from __future__ import annotations

from typing import Any

import torch

from fia_bench.errors import FiaBenchError, unknown_choice


def block_linears(unet: Any, suffix: str, method: str) -> dict[str, torch.nn.Linear]:
    """Every ``…<suffix>`` Linear of the UNet by name, sorted. Feed-forward chunking is refused:
    it splits an FFN's input into pieces that hooks would read as separate calls."""
    found = {
        name: module
        for name, module in unet.named_modules()
        if name.endswith(f".{suffix}") and isinstance(module, torch.nn.Linear)
    }
    if not found:
        raise FiaBenchError(f"{method}: the UNet has no '…{suffix}' Linear layers to mask")
    if suffix.startswith("ff.") and any(getattr(m, "_chunk_size", None) for m in unet.modules()):
        raise FiaBenchError(f"{method}: disable feed-forward chunking; it splits the FFN input")
    return dict(sorted(found.items()))


def task_block(tasks: dict[str, Any], task: str, world: str | None, kind: str) -> tuple[str, Any]:
    """(key, block) of ``tasks.<world>/<task>`` where the config has one, else ``tasks.<task>``:
    the mini world's text encoder knows only its own words, so it brings its own prompt sets."""
    name = f"{world}/{task}" if f"{world}/{task}" in tasks else task
    if name not in tasks:
        raise unknown_choice(f"{kind} for task", name, tasks, "method.settings.tasks")
    return name, tasks[name]
