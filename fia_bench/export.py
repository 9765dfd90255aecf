"""``python -m fia_bench.export <run dir> --method NAME [--n N] [--seed S] --out DIR``: one job's
erased model as a diffusers pipeline folder, for use outside the harness
(``StableDiffusionPipeline.from_pretrained(DIR)``) or to be read back by ``method=checkpoint``.

The run's base model is loaded as the run loaded it (its manifest's resolved config) and checked
against the weight fingerprint the run recorded; the job's edit comes from the erase cache
(``runs.csv`` names its key), so nothing is recomputed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from fia_bench import artifacts
from fia_bench.api import Method
from fia_bench.cache import Cache, read_json
from fia_bench.errors import FiaBenchError
from fia_bench.models import load_model, quiet_loading
from fia_bench.registry import METHODS
from fia_bench.tasks import world_vocabulary


def pick_job(runs: pd.DataFrame, method: str, n: int | None, seed: int | None) -> pd.Series:
    """The one ok job of ``method`` that ``--n`` and ``--seed`` select; ambiguity names the
    choices."""
    if method not in set(runs["method"]):
        raise FiaBenchError(
            f"--method {method}: the run has no such method; valid: "
            f"{', '.join(sorted(set(runs['method'])))}"
        )
    jobs = runs[(runs["method"] == method) & (runs["status"] == "ok")]
    if n is not None:
        jobs = jobs[jobs["n_concepts"] == n]
    if seed is not None:
        jobs = jobs[jobs["seed"] == seed]
    if len(jobs) != 1:
        found = runs[runs["method"] == method]
        choices = ", ".join(
            f"--n {r.n_concepts} --seed {r.seed} ({r.status})" for r in found.itertuples()
        )
        what = "no ok job matches" if jobs.empty else f"{len(jobs)} jobs match"
        raise FiaBenchError(f"--method {method}: {what}; choose one of: {choices}")
    return jobs.iloc[0]


def export(
    run_dir: Path, method: str, out: Path, n: int | None = None, seed: int | None = None
) -> Path:
    for name in ("runs.csv", "manifest.json"):
        if not (run_dir / name).is_file():
            raise FiaBenchError(f"{run_dir} is not a fia_bench run directory (no {name})")
    job = pick_job(pd.read_csv(run_dir / "runs.csv"), method, n, seed)
    if (
        method in METHODS.names()
        and METHODS.get(method).sampling_guidance is not Method.sampling_guidance
    ):
        raise FiaBenchError(
            f"--method {method} changes sampling, not weights (an inference-time method): a "
            "pipeline folder cannot carry it; its images need fia_bench's engine"
        )
    manifest = read_json(run_dir / "manifest.json")
    cfg = OmegaConf.create(manifest["config"])
    delta_path = Cache(cfg.cache_dir).path("erase", str(job["erase_key"]), ".safetensors")
    if int(job["changed_tensors"]) and not delta_path.is_file():
        raise FiaBenchError(
            f"the edit of {method} n={job['n_concepts']} seed={job['seed']} is not in "
            f"cache_dir={cfg.cache_dir} (expected {delta_path.name}); rerun the job to cache it"
        )
    delta = artifacts.Delta.load(delta_path) if delta_path.is_file() else artifacts.Delta()
    model = load_model(cfg.model, world_vocabulary(str(cfg.model.world)), "cpu", str(cfg.precision))
    if model.fingerprint != manifest["inputs"]["model_weights"]:
        raise FiaBenchError(
            f"model {cfg.model.name} loads with weights {model.fingerprint[:12]}, but the run "
            f"used {manifest['inputs']['model_weights'][:12]}: its base model changed since"
        )
    artifacts.apply(model.pipe, delta)
    quiet_loading()
    model.pipe.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fia_bench.export",
        description="Write one job's erased model as a diffusers pipeline folder.",
    )
    parser.add_argument("run", type=Path, help="a run directory (with runs.csv, manifest.json)")
    parser.add_argument("--method", required=True, help="the job's method, as in runs.csv")
    parser.add_argument("--n", type=int, default=None, help="its n_concepts (if several)")
    parser.add_argument("--seed", type=int, default=None, help="its erasure seed (if several)")
    parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.run, args.method, args.out, args.n, args.seed)
    except FiaBenchError as err:
        print(f"fia_bench.export: error: {err}", file=sys.stderr)
        return 2
    print(f"[fia_bench.export] {out}: {args.method} from {args.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
