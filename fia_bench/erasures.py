"""An erasure as the stages see it: the job that asks for it, its cache key, and its entry in the
cache (a sealed metadata record and the delta it describes). The dry run's plan reads the same
entries to count what a run would find cached."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fia_bench import artifacts
from fia_bench.cache import Cache, Damaged, read_sealed_json, stable_hash, write_sealed_json
from fia_bench.guidance import Guidance

if TYPE_CHECKING:
    from fia_bench.api import Method


def erase_key(
    fingerprint: str,
    precision: str,
    method: str,
    settings: dict[str, Any],
    targets: tuple[str, ...],
    retain: tuple[str, ...],
    seed: int,
    task: str,
    inputs: dict[str, Any] | None = None,
    version: int = 0,
) -> str:
    """The erase stage's cache key (also computed by the dry run's plan). ``inputs``: content
    hashes of files the method reads (``Method.input_fingerprint``); ``version``: the method's
    (``Method.version``). Keys of methods that read no file, at version 0, are as before these
    existed."""
    fields = {
        "stage": "erase",
        "model": fingerprint,
        "precision": precision,
        "method": method,
        "settings": settings,
        "targets": targets,
        "retain": retain,
        "seed": seed,
        "task": task,
    }
    if inputs:
        fields["inputs"] = inputs
    if version:
        fields["version"] = version
    return stable_hash(fields)


@dataclass(frozen=True)
class Job:
    method: str
    settings: dict[str, Any]
    n_concepts: int
    seed: int
    targets: tuple[str, ...]
    retain: tuple[str, ...]

    def key(self, fingerprint: str, precision: str, task: str, plugin: type[Method]) -> str:
        """The job's erase cache key on a model and task, for the plugin class it runs."""
        return erase_key(
            fingerprint,
            precision,
            self.method,
            self.settings,
            self.targets,
            self.retain,
            self.seed,
            task,
            plugin.input_fingerprint(self.settings),
            plugin.version,
        )

    def prefix(self, k: int) -> Job:
        """The job that erases only the first ``k`` targets and keeps the rest with the others,
        as a sweep over concept counts makes it."""
        return replace(
            self, n_concepts=k, targets=self.targets[:k], retain=self.targets[k:] + self.retain
        )


@dataclass
class Erased:
    key: str
    status: str
    reason: str
    delta: artifacts.Delta
    meta: dict[str, Any]
    guidance: Guidance | None = None  # an inference-time method's change to sampling

    @property
    def weights_id(self) -> str:
        return self.meta["weights_id"]

    def sampling_identity(self) -> dict[str, Any]:
        """What the erased model's images and attack prompts are keyed by: its weights and, only
        when set, its guidance (so images of unguided models keep their keys)."""
        identity: dict[str, Any] = {"weights": self.weights_id}
        if self.guidance is not None:
            identity["guidance"] = self.guidance.identity()
        return identity


class ErasureStore:
    """The erase stage's cache entries. The delta is written first and the record last, so a
    record marks a complete entry; a damaged entry (a record that does not parse or match its
    digest, a delta that does not give the weights its record names) is set aside and counts as
    absent, to be computed again. ``weights_id`` names the weights a delta makes of the base."""

    def __init__(self, cache: Cache, weights_id: Callable[[artifacts.Delta], str]) -> None:
        self.cache, self.weights_id = cache, weights_id

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.cache.path("erase", key, ".json"), self.cache.path("erase", key, ".safetensors")

    def record(self, key: str) -> dict[str, Any] | None:
        """The record of a complete entry, its delta not re-hashed (what the dry run counts as
        cached); None when there is none or it is damaged."""
        meta_path, delta_path = self.paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = checked_record(read_sealed_json(meta_path))
        except Damaged:
            return None
        return meta if meta["status"] != "ok" or delta_path.exists() else None

    def load(self, key: str) -> Erased | None:
        """The stored erasure, its delta verified; None when there is none yet or it was
        damaged (and has been set aside)."""
        meta_path, delta_path = self.paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = checked_record(read_sealed_json(meta_path))
            delta = artifacts.Delta()
            if meta["status"] == "ok":
                if not delta_path.exists():
                    return None
                delta = self.verified_delta(delta_path, str(meta.get("weights_id")))
        except Damaged as err:
            self.cache.set_aside([meta_path, delta_path], str(err))
            return None
        return Erased(key, meta["status"], meta["reason"], delta, meta)

    def verified_delta(self, path: Path, weights_id: str) -> artifacts.Delta:
        try:
            delta = artifacts.Delta.load(path)
        except Exception as err:  # safetensors raises its own error types for a bad file
            raise Damaged(f"delta unreadable ({type(err).__name__})") from err
        if self.weights_id(delta) != weights_id:
            raise Damaged("delta does not hash to the weights its metadata records")
        return delta

    def save(self, key: str, meta: dict[str, Any], delta: artifacts.Delta) -> Erased:
        """Store an erasure (a failed one without its delta) and return it."""
        meta_path, delta_path = self.paths(key)
        if meta["status"] == "ok":
            delta.save(delta_path, {"method": meta["method"], "erase_key": key})
        write_sealed_json(meta_path, meta)
        return Erased(key, meta["status"], meta["reason"], delta, meta)


def checked_record(meta: Any) -> dict[str, Any]:
    if not (isinstance(meta, dict) and meta.get("status") in ("ok", "failed")):
        raise Damaged("not an erasure record")
    return meta
