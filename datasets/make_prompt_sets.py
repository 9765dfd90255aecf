"""Writes the fixed object prompt sets of the SD world (ESD convention: case_id, prompt,
evaluation_seed, concept), so a benchmark's prompts and seeds are versioned files, not code.

    python -m fia_bench.datasets.make_prompt_sets [--out datasets/data/sd]

* ``imagenette.csv``: the 10 Imagenette classes × 500 rows of "an image of a <class>" (the layout
  of ESD's and FIA's imagenette.csv; our own seeds).
* ``imagenet50.csv``: those 10 plus FIA Fig. 6's 40 extra classes (methods.md §2.7) × 100 rows.

Seeds are drawn without replacement from [0, 2^31) by a generator seeded with the set's name, so
re-running the script rewrites identical files.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fia_bench.cache import write_text
from fia_bench.tasks import data_root

TEMPLATE = "an image of a {concept}"


def prompt_set(name: str, concepts: list[str], per_concept: int) -> pd.DataFrame:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    seeds = rng.choice(2**31, size=len(concepts) * per_concept, replace=False)
    rows = [
        (
            f"{concept.replace(' ', '_')}-{i:04d}",
            TEMPLATE.format(concept=concept),
            int(seeds[c * per_concept + i]),
            concept,
        )
        for c, concept in enumerate(concepts)
        for i in range(per_concept)
    ]
    return pd.DataFrame(rows, columns=["case_id", "prompt", "evaluation_seed", "concept"])


def concepts_of(task: str) -> list[str]:
    text = (data_root() / "sd" / f"{task}.yaml").read_text(encoding="utf-8")
    return list(yaml.safe_load(text)["concepts"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fia_bench.datasets.make_prompt_sets")
    parser.add_argument("--out", type=Path, default=data_root() / "sd")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, task, per_concept in (
        ("imagenette", "objects", 500),
        ("imagenet50", "objects50", 100),
    ):
        frame = prompt_set(name, concepts_of(task), per_concept)
        write_text(args.out / f"{name}.csv", frame.to_csv(index=False, lineterminator="\n"))
        print(f"wrote {args.out / f'{name}.csv'}: {len(frame)} rows")


if __name__ == "__main__":
    main()
