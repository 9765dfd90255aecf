"""Settings declared with their types and ranges, so a whole configuration is checked before any
model loads and a bad value ends in one line naming the key, the value and what is valid.

Every plugin declares its settings once, next to its class, as ``SETTINGS = Schema(...)``;
``fia_bench/validate.py`` reads these declarations, and the top-level keys are declared the same
way there. Values must have the declared type exactly: an integer setting refuses 1.5 instead of
truncating it, and a number is always finite (nan and inf are refused)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fia_bench.errors import FiaBenchError, unknown_choice


def shown(value: Any) -> str:
    """A value as the user wrote it on the command line (lists and dicts in YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Field:
    """One setting: its kind, bounds, choices and, for lists and mappings, what they hold."""

    kind: str  # int | real | flag | text | choice | items | mapping | table | either
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    null: bool = False
    item: Field | None = None  # what a list holds, or a mapping's values
    min_items: int = 0
    table: Schema | None = None  # a mapping with named keys of its own
    options: tuple[Field, ...] = ()  # either: the first option that takes the value checks it

    def describe(self, plural: bool = False) -> str:
        if self.kind in ("int", "real"):
            noun = {"int": "an integer", "real": "a finite number"}[self.kind]
            if plural:
                noun = {"int": "integers", "real": "finite numbers"}[self.kind]
            bounds = [
                f"{op} {int(bound) if float(bound).is_integer() else bound}"
                for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                if bound is not None
            ]
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        elif self.kind == "choice":
            text = ("each " if plural else "") + "one of " + ", ".join(self.choices)
        elif self.kind in ("items", "mapping"):
            held = self.item.describe(plural=True) if self.item else "values"
            size = "a non-empty list" if self.min_items else "a list"
            text = f"{size} of {held}" if self.kind == "items" else f"a mapping of names to {held}"
        elif self.kind == "either":
            text = " or ".join(option.describe(plural) for option in self.options)
        else:
            text = {
                "flag": "true/false values" if plural else "true or false",
                "text": "strings" if plural else "a string",
                "table": "mappings" if plural else "a mapping",
            }[self.kind]
        return f"null or {text}" if self.null else text

    def check(self, value: Any, key: str) -> None:
        if value is None and self.null:
            return
        if self.kind == "either":
            for option in self.options:
                try:
                    return option.check(value, key)
                except FiaBenchError:
                    continue
        if self.kind == "choice" and isinstance(value, str) and value not in self.choices:
            raise unknown_choice(key, value, self.choices, f"{key}=")
        if self.kind == "either" or not self.accepts(value):
            raise FiaBenchError(f"{key}={shown(value)}: must be {self.describe()}")
        if self.kind == "items":
            for i, entry in enumerate(value):
                if self.item:
                    self.item.check(entry, f"{key}[{i}]")
        elif self.kind == "mapping" and self.item:
            for name, entry in value.items():
                self.item.check(entry, f"{key}.{name}")
        elif self.kind == "table" and self.table:
            self.table.check(value, key)

    def accepts(self, value: Any) -> bool:
        if self.kind in ("int", "real"):
            number = isinstance(value, int) or (self.kind == "real" and isinstance(value, float))
            if isinstance(value, bool) or not number or not math.isfinite(value):
                return False
            return (
                (self.ge is None or value >= self.ge)
                and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le)
                and (self.lt is None or value < self.lt)
            )
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "items":
            return isinstance(value, (list, tuple)) and len(value) >= self.min_items
        if self.kind in ("mapping", "table"):
            return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        if self.kind == "flag":
            return isinstance(value, bool)
        return isinstance(value, str)


def Int(**bounds: Any) -> Field:
    return Field("int", **bounds)


def Real(**bounds: Any) -> Field:
    return Field("real", **bounds)


def Flag(null: bool = False) -> Field:
    return Field("flag", null=null)


def Text(null: bool = False) -> Field:
    return Field("text", null=null)


def Choice(*choices: str, null: bool = False) -> Field:
    return Field("choice", choices=tuple(choices), null=null)


def Items(item: Field | None = None, min_items: int = 0, null: bool = False) -> Field:
    return Field("items", item=item, min_items=min_items, null=null)


def Dict(item: Field | None = None, null: bool = False) -> Field:
    return Field("mapping", item=item, null=null)


def Table(null: bool = False, **fields: Field) -> Field:
    return Field("table", table=Schema(**fields), null=null)


def Either(*options: Field, null: bool = False) -> Field:
    return Field("either", options=options, null=null)


@dataclass(frozen=True)
class Schema:
    """The settings a plugin (or a config section) takes; a key it does not declare is refused
    with the declared ones named."""

    fields: dict[str, Field] = field(default_factory=dict)

    def __init__(self, **fields: Field) -> None:
        object.__setattr__(self, "fields", fields)

    def check(self, values: Mapping[str, Any] | None, where: str) -> None:
        if values is not None and not isinstance(values, Mapping):
            raise FiaBenchError(f"{where}={shown(values)}: must be a mapping of settings")
        for key, value in (values or {}).items():
            if key not in self.fields:
                raise unknown_choice("setting", str(key), self.fields, where)
            self.fields[key].check(value, f"{where}.{key}" if where else str(key))
