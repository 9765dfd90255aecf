"""Tasks are data: each world ships ``<task>.yaml`` files with an ordered concept list and prompt
templates (``datasets/data/<world>/``). The world's text vocabulary is derived from the same files,
so a tokenizer built for it can spell every prompt the harness will write."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import yaml

from fia_bench.api import Task
from fia_bench.errors import FiaBenchError, unknown_choice


def data_root() -> Path:
    return Path(str(files("fia_bench.datasets") / "data"))


def worlds() -> list[str]:
    return sorted(p.name for p in data_root().iterdir() if p.is_dir())


def load_task(name: str, world: str) -> Task:
    world_dir = data_root() / world
    if not world_dir.is_dir():
        raise unknown_choice("world", world, worlds(), "model.world")
    path = world_dir / f"{name}.yaml"
    if not path.is_file():
        raise unknown_choice(
            f"task for world '{world}'", name, [p.stem for p in world_dir.glob("*.yaml")], "task="
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    concepts = tuple(str(c) for c in data.get("concepts") or ())
    templates = tuple(str(t) for t in data.get("templates") or ())
    if not concepts or not templates or any("{concept}" not in t for t in templates):
        raise FiaBenchError(
            f"{path}: needs a non-empty 'concepts' list and 'templates' that "
            "each contain {concept}"
        )
    if len(set(concepts)) != len(concepts):
        raise FiaBenchError(f"{path}: concept names repeat")
    superclasses = {str(k): str(v) for k, v in (data.get("superclasses") or {}).items()}
    unknown = sorted(set(superclasses) - set(concepts))
    if unknown:
        raise FiaBenchError(f"{path}: superclasses given for unknown concepts {unknown}")
    kind = str(data.get("kind") or name)
    return Task(name, world, concepts, templates, str(path), superclasses, kind)


def world_vocabulary(world: str) -> list[str]:
    words: set[str] = set()
    for path in sorted((data_root() / world).glob("*.yaml")):
        task = load_task(path.stem, world)
        parts = [*task.concepts, *task.templates, *task.superclasses.values()]
        text = " ".join(parts).replace("{concept}", " ")
        words.update(re.findall(r"[a-z0-9]+", text.lower()))
    return sorted(words)
