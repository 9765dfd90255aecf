"""Name → plugin registries for methods, evaluators and prompt datasets.

Configs select plugins by registry name, never by import path, so renaming a module never breaks
an experiment file and the command line cannot import arbitrary code. Built-in plugins are declared
as lazy ``"module:attr"`` strings so that importing the core does not pull in every plugin's heavy
dependencies. Built-in and third-party plugins are found the same way, through entry points (groups
``fia_bench.methods``, ``fia_bench.evaluators``, ``fia_bench.datasets``, ``fia_bench.attacks``;
ours are listed in
``pyproject.toml``), so adding a baseline never touches the core.
"""

from __future__ import annotations

import importlib
import tomllib
from functools import cache
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from fia_bench.errors import FiaBenchError, unknown_choice

T = TypeVar("T")


def declared_entry_points(group: str) -> list[EntryPoint]:
    """The installed entry points of ``group``. A checkout run without being installed (on a
    ``PYTHONPATH``, as on a cluster node or a lent GPU machine) has no metadata of its own, so
    our entry points are then read from its ``pyproject.toml``, the one list that declares them:
    the built-in plugins never vanish."""
    found = list(entry_points(group=group))
    try:
        distribution("fia_bench")
    except PackageNotFoundError:
        ours = checkout_entry_points().get(group, {})
        found += [EntryPoint(name, value, group) for name, value in ours.items()]
    return found


@cache
def checkout_entry_points() -> dict[str, dict[str, str]]:
    """``[project.entry-points]`` of the ``pyproject.toml`` beside this package, if any."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    with pyproject.open("rb") as handle:
        return tomllib.load(handle).get("project", {}).get("entry-points", {})


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str, base: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._base_spec = base
        self._specs: dict[str, str] = {}
        self._entry_specs: dict[str, str] = {}
        self._loaded: dict[str, type[T]] = {}
        self._entry_points_read = False

    def register(self, name: str):
        """Class decorator for plugins defined in code (notebooks, tests, third-party modules)."""

        def decorator(cls: type[T]) -> type[T]:
            spec = f"{cls.__module__}:{cls.__qualname__}"
            self._claim(name, spec)
            self._check_base(name, cls)
            self._specs[name] = spec
            self._loaded[name] = cls
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Drop an in-code registration; a plugin installed through an entry point stays."""
        self._read_entry_points()
        self._loaded.pop(name, None)
        if name in self._entry_specs:
            self._specs[name] = self._entry_specs[name]
        else:
            self._specs.pop(name, None)

    def _claim(self, name: str, spec: str) -> None:
        existing = self._specs.get(name)
        if existing is not None and existing != spec:
            raise FiaBenchError(
                f"{self.kind} '{name}' is registered twice: by {existing} and by {spec}"
            )

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        for ep in declared_entry_points(self.entry_point_group):
            self._entry_specs[ep.name] = ep.value
            self._specs.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted(self._specs)

    def source(self, name: str) -> str:
        """Where a registered plugin's class comes from, as ``module:attr``."""
        self._read_entry_points()
        if name not in self._specs:
            raise unknown_choice(self.kind, name, self._specs)
        return self._specs[name]

    def get(self, name: str, where: str = "") -> type[T]:
        self._read_entry_points()
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._specs:
            raise unknown_choice(self.kind, name, self._specs, where)
        module_name, _, attr = self._specs[name].partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        self._check_base(name, obj)
        self._loaded[name] = obj
        return obj

    def _check_base(self, name: str, cls: Any) -> None:
        module_name, _, attr = self._base_spec.partition(":")
        base = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise FiaBenchError(f"{self.kind} '{name}' must be a subclass of {base.__name__}")


METHODS: Registry = Registry("method", "fia_bench.methods", "fia_bench.api:Method")
EVALUATORS: Registry = Registry("evaluator", "fia_bench.evaluators", "fia_bench.api:Evaluator")
DATASETS: Registry = Registry("dataset", "fia_bench.datasets", "fia_bench.api:PromptDataset")
ATTACKS: Registry = Registry("attack", "fia_bench.attacks", "fia_bench.api:Attack")
