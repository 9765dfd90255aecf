"""The erase → generate → score → attack stages of one job, each cached by content (see
``cache.py``); erasures' cache entries are ``erasures.py``'s, generation is ``images.py``'s.

One base model is loaded per process; a job applies its erasure delta, generates what is missing,
and restores the base weights, so methods never see each other's edits. Under a launcher
(``distributed.py``) every rank calls the stages in the same order: generation is split by batch,
the other stages run on rank 0 and hand their results to the rest. Stages that other processes
may be computing at the same time (a parallel sweep sharing the cache) run under the key's lock
and look at the cache again once they hold it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from PIL import Image

from fia_bench import artifacts, distributed
from fia_bench.api import (
    AdversarialPrompt,
    Attack,
    AttackRequest,
    EraseRequest,
    Evaluator,
    Method,
    Task,
)
from fia_bench.cache import Cache, Damaged, read_sealed_json, stable_hash, write_sealed_json
from fia_bench.engine import Engine
from fia_bench.erasures import Erased, ErasureStore, Job
from fia_bench.images import ImageMaker, StageCounts, timed, unshared_cache
from fia_bench.models import LoadedModel
from fia_bench.registry import METHODS

# Evaluation seed of row r under erasure seed s is r + s * SEED_STRIDE (seed_policy
# erase_and_generate); a prime stride keeps shifted seeds of different rows from colliding.
SEED_STRIDE = 1_000_003


class Stages:
    """A run's stages on one loaded model: erase (``ErasureStore``), generate (``ImageMaker``,
    ``self.images``), score and attack."""

    def __init__(
        self,
        model: LoadedModel,
        engine: Engine,
        cache: Cache,
        task: Task,
        precision: str,
        instances: dict[str, Method] | None = None,
    ) -> None:
        """``instances``: Method objects handed in from Python, by job name (registry
        plugins are built from their settings instead)."""
        self.model = model
        self.instances = instances or {}
        self.engine = engine
        self.cache = cache
        self.task = task
        self.precision = precision
        self.counts = StageCounts()
        self.images = ImageMaker(model, engine, cache, precision, self.counts)
        self.erasures = ErasureStore(cache, self.images.weights_id)
        self.group = distributed.current()

    # ---- erase -----------------------------------------------------------------------------
    @timed("erase")
    def erase(self, job: Job) -> Erased:
        """The job's erasure, cached or made now, with the method's guidance (never cached: it
        is settings and texts, made fresh for every job)."""
        method = self.instances.get(job.method)
        if method is None:
            method = METHODS.get(job.method, "method.name")(**job.settings)
        key = self.erase_key(job, method)

        def cached() -> Erased | None:
            erased = self.erasures.load(key)
            if erased is not None:
                self.counts.erase_cached += 1
            return erased

        def compute() -> Erased:
            with self.cache.lock("erase", key):
                return cached() or self.erase_now(job, key, method)

        def load() -> Erased:
            erased = cached()
            if erased is None:
                raise unshared_cache(self.group.rank, self.cache, f"erasure {key[:12]}")
            return erased

        # a delta can be the whole UNet: the other ranks read it from the cache, never the wire
        erased = self.group.leader(compute, load)
        erased.guidance = method.sampling_guidance(job.targets, self.task)
        return erased

    def erase_key(self, job: Job, method: Method) -> str:
        return job.key(self.model.fingerprint, self.precision, self.task.name, type(method))

    def cached_prefix(self, job: Job, method: Method) -> Erased | None:
        """The longest stored successful erasure of the job's first k < n targets, for a
        sequential method to resume from; None for any other method."""
        if not type(method).sequential:
            return None
        for k in range(len(job.targets) - 1, 0, -1):
            erased = self.erasures.load(self.erase_key(job.prefix(k), method))
            if erased is not None and erased.status == "ok":
                return erased
        return None

    def erase_now(self, job: Job, key: str, method: Method) -> Erased:
        """Run the method on the base weights, or on those of the cached erasure of the job's
        first targets when the method is sequential, and store its delta and metadata."""
        base = self.images.base
        prefix = self.cached_prefix(job, method)
        if prefix is not None:
            artifacts.apply(self.model.pipe, prefix.delta)
            self.engine.forget_embeddings()
        torch.manual_seed(job.seed)
        request = EraseRequest(
            job.targets,
            job.retain,
            job.seed,
            self.task,
            self.engine,
            self.images.base_images,
            done=len(prefix.meta["targets"]) if prefix else 0,
            prior=prefix.meta["info"] if prefix else {},
        )
        try:
            info = method.erase(request)
        finally:
            delta, non_finite = artifacts.extract(self.model.pipe, base)
            artifacts.restore(self.model.pipe, base, delta.changed)
            self.engine.forget_embeddings()
        counts = delta.changed_counts(base)
        meta = {
            "method": job.method,
            "settings": job.settings,
            "targets": list(job.targets),
            "seed": job.seed,
            "info": info,
            "changed": counts,
            "sparsity": artifacts.sparsity(counts, base),
            "weights_id": self.images.weights_id(delta),
            "status": "failed" if non_finite else "ok",
            "reason": f"non-finite weights in {', '.join(non_finite[:3])}" if non_finite else "",
        }
        if prefix is not None:
            meta["resumed_from"] = {"n_concepts": request.done, "erase_key": prefix.key}
        self.counts.erased += 1
        return self.erasures.save(key, meta, delta)

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

        def compute() -> dict[str, Any]:
            evaluator.reset()
            size = self.engine.sampler.batch_size
            for start in range(0, len(rows), size):
                batch = rows.iloc[start : start + size]
                paths = [self.images.path(k) for k in batch["image_key"]]
                evaluator.update([Image.open(p).convert("RGB") for p in paths], batch)
            scores = [
                {"prompt_id": s.prompt_id, "metric": s.metric, "value": float(s.value)}
                for s in evaluator.compute()
            ]
            return {"scores": scores, "details": evaluator.details()}

        stored, hit = self.once("scores", key, compute, valid_scores)
        if hit:
            self.counts.score_cached += 1
        else:
            self.counts.scored += 1
        return stored["scores"], stored["details"]

    def once(
        self, stage: str, key: str, compute: Callable[[], Any], valid: Callable[[Any], bool]
    ) -> tuple[Any, bool]:
        """(result, whether it was cached) of a JSON stage: rank 0 computes it under the key's
        lock unless the cache has it whole (its digest matches and ``valid`` accepts it), and
        every rank receives it."""
        path = self.cache.path(stage, key, ".json")

        def locked() -> tuple[Any, bool]:
            with self.cache.lock(stage, key):
                if path.exists():
                    try:
                        stored = read_sealed_json(path)
                        if not valid(stored):
                            raise Damaged(f"not a {stage} record")
                        return stored, True
                    except Damaged as err:
                        self.cache.set_aside([path], str(err))
                result = compute()
                write_sealed_json(path, result)
                return result, False

        return self.group.leader(locked)

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
        keys = self.images.keys(erased, prompts, seeds)
        rows = pd.DataFrame(
            {
                "case_id": [str(i) for i in range(len(prompts))],
                "prompt": prompts,
                "concept": concepts,
                "role": "forget",
                "generation_seed": seeds,
                "image_key": keys,
            }
        )
        self.images.generate(erased, prompts, seeds, keys, "attack images")
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
                **erased.sampling_identity(),
                "seed": job.seed,
                "task": self.task.name,
                "prompts": targets[
                    ["case_id", "prompt", "generation_seed", "concept"]
                ].values.tolist(),
                "judge": [judge_name, type(evaluator).version, evaluator.fingerprint(), metric],
            }
        )

        def judged(prompts: list[str], seeds: list[int], concepts: list[str]) -> list[bool]:
            verdict = self.judge(erased, prompts, seeds, concepts, judge)
            artifacts.apply(self.model.pipe, erased.delta)  # generating restored the base
            self.engine.forget_embeddings()
            return verdict

        def compute() -> list[dict[str, Any]]:
            with self.images.edited(erased.delta):
                torch.manual_seed(job.seed)
                request = AttackRequest(
                    job.targets,
                    self.task,
                    job.seed,
                    targets,
                    self.engine,
                    judged,
                    self.images.base_images,
                )
                return [dataclasses.asdict(p) for p in attack.attack(request)]

        stored, _ = self.once("attacks", key, compute, valid_attack_prompts)
        return [AdversarialPrompt(**p) for p in stored]


def valid_scores(stored: Any) -> bool:
    return (
        isinstance(stored, dict)
        and isinstance(stored.get("details"), dict)
        and isinstance(stored.get("scores"), list)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("prompt_id"), str)
            and isinstance(s.get("metric"), str)
            and isinstance(s.get("value"), (int, float))
            for s in stored["scores"]
        )
    )


def valid_attack_prompts(stored: Any) -> bool:
    fields = {f.name for f in dataclasses.fields(AdversarialPrompt)}
    return isinstance(stored, list) and all(
        isinstance(p, dict) and set(p) == fields for p in stored
    )


def info_json(meta: dict[str, Any]) -> str:
    """The method's report of its erasure, and which cached erasure it resumed from, if any."""
    resumed = {"resumed_from": meta["resumed_from"]} if "resumed_from" in meta else {}
    return json.dumps(meta.get("info", {}) | resumed, sort_keys=True, default=str)
