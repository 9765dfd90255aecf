"""The erase → generate → score stages of one job, each cached by content (see ``cache.py``).

One base model is loaded per process; a job applies its erasure delta, generates what is missing,
and restores the base weights, so methods never see each other's edits."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from fia_bench import artifacts
from fia_bench.api import AdversarialPrompt, Attack, AttackRequest, EraseRequest, Evaluator, Task
from fia_bench.cache import Cache, atomic_write, read_json, stable_hash, write_json
from fia_bench.engine import Engine
from fia_bench.models import LoadedModel
from fia_bench.registry import METHODS

# Evaluation seed of row r under erasure seed s is r + s * SEED_STRIDE (seed_policy
# erase_and_generate); a prime stride keeps shifted seeds of different rows from colliding.
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Job:
    method: str
    settings: dict[str, Any]
    n_concepts: int
    seed: int
    targets: tuple[str, ...]
    retain: tuple[str, ...]


@dataclass
class Erased:
    key: str
    status: str
    reason: str
    delta: artifacts.Delta
    meta: dict[str, Any]

    @property
    def weights_id(self) -> str:
        return self.meta["weights_id"]


@dataclass
class StageCounts:
    erased: int = 0
    erase_cached: int = 0
    images_generated: int = 0
    images_cached: int = 0
    scored: int = 0
    score_cached: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def timed(stage: str) -> Callable:
    """Add the wrapped stage's wall time to ``self.counts.seconds[stage]`` (for the manifest)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self: Stages, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                seconds = self.counts.seconds
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start

        return wrapper

    return decorate


class Stages:
    def __init__(
        self, model: LoadedModel, engine: Engine, cache: Cache, task: Task, precision: str
    ) -> None:
        self.model = model
        self.engine = engine
        self.cache = cache
        self.task = task
        self.precision = precision
        self.base = artifacts.snapshot(model.pipe)
        self.base_weights_id = self.weights_id(artifacts.Delta())
        self.counts = StageCounts()

    def weights_id(self, delta: artifacts.Delta) -> str:
        """Identity of the weights an image is made with: base model plus the delta."""
        return stable_hash([self.model.fingerprint, delta.digest()])

    # ---- erase -----------------------------------------------------------------------------
    @timed("erase")
    def erase(self, job: Job) -> Erased:
        key = stable_hash(
            {
                "stage": "erase",
                "model": self.model.fingerprint,
                "precision": self.precision,
                "method": job.method,
                "settings": job.settings,
                "targets": job.targets,
                "retain": job.retain,
                "seed": job.seed,
                "task": self.task.name,
            }
        )
        meta_path = self.cache.path("erase", key, ".json")
        delta_path = self.cache.path("erase", key, ".safetensors")
        if meta_path.exists() and (read_json(meta_path)["status"] != "ok" or delta_path.exists()):
            meta = read_json(meta_path)
            self.counts.erase_cached += 1
            delta = artifacts.Delta.load(delta_path) if meta["status"] == "ok" else None
            return Erased(key, meta["status"], meta["reason"], delta or artifacts.Delta(), meta)
        method = METHODS.get(job.method, "method.name")(**job.settings)
        torch.manual_seed(job.seed)
        request = EraseRequest(
            job.targets, job.retain, job.seed, self.task, self.engine, self.base_images
        )
        try:
            info = method.erase(request)
        finally:
            delta, non_finite = artifacts.extract(self.model.pipe, self.base)
            artifacts.restore(self.model.pipe, self.base, delta.changed)
            self.engine.forget_embeddings()
        counts = delta.changed_counts(self.base)
        meta = {
            "method": job.method,
            "settings": job.settings,
            "targets": list(job.targets),
            "seed": job.seed,
            "info": info,
            "changed": counts,
            "sparsity": artifacts.sparsity(counts, self.base),
            "weights_id": self.weights_id(delta),
            "status": "failed" if non_finite else "ok",
            "reason": f"non-finite weights in {', '.join(non_finite[:3])}" if non_finite else "",
        }
        if not non_finite:
            delta.save(delta_path, {"method": job.method, "erase_key": key})
        write_json(meta_path, meta)
        self.counts.erased += 1
        return Erased(key, meta["status"], meta["reason"], delta, meta)

    # ---- generate --------------------------------------------------------------------------
    def base_images(
        self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None
    ) -> list[Image.Image]:
        """Unedited-model images via the image cache, callable in the middle of an edit: the
        edit is set aside, the images made or loaded, and the edit put back."""
        edit, _ = artifacts.extract(self.model.pipe, self.base)
        artifacts.restore(self.model.pipe, self.base, edit.changed)
        base = Erased("base", "ok", "", artifacts.Delta(), {"weights_id": self.base_weights_id})
        keys = self.image_keys(base, prompts, seeds, negative_prompts)
        try:
            self.generate(base, prompts, seeds, keys, "base images", negative_prompts)
        finally:
            artifacts.apply(self.model.pipe, edit)
            self.engine.forget_embeddings()
        return [Image.open(self.image_path(k)).convert("RGB") for k in keys]

    def image_keys(
        self,
        erased: Erased,
        prompts: list[str],
        seeds: list[int],
        negative_prompts: list[str] | None = None,
    ) -> list[str]:
        identity = {
            "weights": erased.weights_id,
            "sampler": self.engine.sampler.cache_identity(),
            "resolution": self.engine.resolution,
            "precision": self.precision,
        }
        negatives = negative_prompts or [""] * len(prompts)
        return [
            # the negative prompt enters the key only when set, so plain images keep their keys
            stable_hash({"prompt": p, "seed": s, **identity} | ({"negative": n} if n else {}))
            for p, s, n in zip(prompts, seeds, negatives, strict=True)
        ]

    def image_path(self, key: str):
        return self.cache.path("images", key, ".png")

    @timed("generate")
    def generate(
        self,
        erased: Erased,
        prompts: list[str],
        seeds: list[int],
        keys: list[str],
        label: str,
        negative_prompts: list[str] | None = None,
    ) -> None:
        """Generate missing images in fixed batches of the job's row order, so a resumed run
        repeats exactly the batches an uninterrupted one would have made."""
        size = self.engine.sampler.batch_size
        batches = [range(i, min(i + size, len(keys))) for i in range(0, len(keys), size)]
        todo = [b for b in batches if any(not self.image_path(keys[i]).exists() for i in b)]
        self.counts.images_cached += len(keys) - sum(len(b) for b in todo)
        if not todo:
            return
        artifacts.apply(self.model.pipe, erased.delta)
        self.engine.forget_embeddings()
        try:
            for batch in tqdm(todo, desc=f"generate {label}", unit="batch", leave=False):
                images = self.engine.generate(
                    [prompts[i] for i in batch],
                    [seeds[i] for i in batch],
                    [negative_prompts[i] for i in batch] if negative_prompts else None,
                )
                for i, image in zip(batch, images, strict=True):
                    path = self.image_path(keys[i])
                    if path.exists():
                        self.counts.images_cached += 1
                        continue
                    atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
                    self.counts.images_generated += 1
        finally:
            artifacts.restore(self.model.pipe, self.base, erased.delta.changed)
            self.engine.forget_embeddings()

    # ---- score -----------------------------------------------------------------------------
    @timed("score")
    def score(
        self, name: str, evaluator: Evaluator, rows: pd.DataFrame
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(scores, raw per-prompt details such as detections) of one image set."""
        key = stable_hash(
            {
                "stage": "score",
                "evaluator": name,
                "version": type(evaluator).version,
                "fingerprint": evaluator.fingerprint(),
                "rows": rows[["image_key", "case_id", "prompt", "concept", "role"]].values.tolist(),
            }
        )
        path = self.cache.path("scores", key, ".json")
        if path.exists():
            self.counts.score_cached += 1
            stored = read_json(path)
            return stored["scores"], stored["details"]
        evaluator.reset()
        size = self.engine.sampler.batch_size
        for start in range(0, len(rows), size):
            batch = rows.iloc[start : start + size]
            images = [Image.open(self.image_path(k)).convert("RGB") for k in batch["image_key"]]
            evaluator.update(images, batch)
        scores = [
            {"prompt_id": s.prompt_id, "metric": s.metric, "value": float(s.value)}
            for s in evaluator.compute()
        ]
        details = evaluator.details()
        write_json(path, {"scores": scores, "details": details})
        self.counts.scored += 1
        return scores, details

    # ---- attack ----------------------------------------------------------------------------
    def judge(
        self,
        erased: Erased,
        prompts: list[str],
        seeds: list[int],
        concepts: list[str],
        judge: tuple[str, Evaluator, str],
    ) -> list[bool]:
        """Generate with the erased model (through the image cache) and ask the judge whether
        each image shows its concept: a judge metric of 100 (flagged, classified) is success."""
        name, evaluator, metric = judge
        keys = self.image_keys(erased, prompts, seeds)
        rows = pd.DataFrame(
            {
                "case_id": [str(i) for i in range(len(prompts))],
                "prompt": prompts,
                "concept": concepts,
                "role": "target",
                "generation_seed": seeds,
                "image_key": keys,
            }
        )
        self.generate(erased, prompts, seeds, keys, "attack images")
        scores, _ = self.score(name, evaluator, rows)
        verdict = {s["prompt_id"]: s["value"] >= 50 for s in scores if s["metric"] == metric}
        return [verdict[case] for case in rows["case_id"]]

    @timed("attack")
    def attack(
        self,
        name: str,
        attack: Attack,
        settings: dict[str, Any],
        erased: Erased,
        job: Job,
        targets: pd.DataFrame,
        judge: tuple[str, Evaluator, str],
    ) -> list[AdversarialPrompt]:
        """Adversarial prompts of one attack against one erased model, cached (they are worth
        publishing: their absence is a top complaint about attack papers)."""
        judge_name, evaluator, metric = judge
        key = stable_hash(
            {
                "stage": "attack",
                "attack": name,
                "settings": settings,
                "weights": erased.weights_id,
                "seed": job.seed,
                "task": self.task.name,
                "prompts": targets[
                    ["case_id", "prompt", "generation_seed", "concept"]
                ].values.tolist(),
                "judge": [judge_name, type(evaluator).version, evaluator.fingerprint(), metric],
            }
        )
        path = self.cache.path("attacks", key, ".json")
        if path.exists():
            return [AdversarialPrompt(**p) for p in read_json(path)]
        pipe = self.model.pipe

        def judged(prompts: list[str], seeds: list[int], concepts: list[str]) -> list[bool]:
            verdict = self.judge(erased, prompts, seeds, concepts, judge)
            artifacts.apply(pipe, erased.delta)  # generating restored the base weights
            self.engine.forget_embeddings()
            return verdict

        artifacts.apply(pipe, erased.delta)
        self.engine.forget_embeddings()
        try:
            torch.manual_seed(job.seed)
            request = AttackRequest(
                job.targets, self.task, job.seed, targets, self.engine, judged, self.base_images
            )
            prompts = attack.attack(request)
        finally:
            artifacts.restore(pipe, self.base, erased.delta.changed)
            self.engine.forget_embeddings()
        write_json(path, [dataclasses.asdict(p) for p in prompts])
        return prompts


def info_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta.get("info", {}), sort_keys=True, default=str)
