"""Experiment trackers. Plain files are always written by the report; ``logger=wandb`` also sends
the config, the summary and test tables and the figures to a wandb run (offline by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fia_bench.errors import FiaBenchError, unknown_choice

LOGGERS = ("files", "wandb")


def log_run(cfg: Any, out_dir: Path, summary: pd.DataFrame, tests: pd.DataFrame) -> None:
    name = str(cfg.logger.name)
    if name not in LOGGERS:
        raise unknown_choice("logger", name, LOGGERS, "logger=")
    if name == "wandb":
        log_wandb(cfg, out_dir, summary, tests)


def log_wandb(cfg: Any, out_dir: Path, summary: pd.DataFrame, tests: pd.DataFrame) -> None:
    from omegaconf import OmegaConf

    try:
        import wandb
    except ImportError as err:
        raise FiaBenchError(
            "logger=wandb needs the wandb package: pip install 'fia_bench[wandb]'"
        ) from err
    run = wandb.init(
        project=str(cfg.logger.project),
        mode=str(cfg.logger.mode),
        dir=str(out_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        name=out_dir.name,
        reinit="finish_previous",
    )
    run.log(
        {
            "summary": wandb.Table(dataframe=summary.astype(str)),
            "tests": wandb.Table(dataframe=tests.astype(str)),
            **{p.stem: wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))},
        }
    )
    for row in summary.itertuples():
        run.summary[f"{row.method}/n{row.n_concepts}/{row.evaluator}/{row.metric}/{row.role}"] = (
            row.mean
        )
    run.finish()
