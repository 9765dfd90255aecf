"""``python -m fia_bench`` / ``fia-bench``: Hydra composes the config, the runner does the work.

``--dry-run`` (anywhere on the line, with or without ``-m``) is taken off before Hydra sees the
arguments: it prints what the job or the recipe's sweep would erase, generate and score, the
cache hits and the projected GPU-hours (``fia_bench/plan.py``), and does nothing else.

Bad input ends with one line on stderr and exit code 2; everything computed before the error
stays in the cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fia_bench.errors import FiaBenchError, unknown_choice

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    from fia_bench.runner import run

    try:
        result = run(cfg)
    except FiaBenchError as err:
        print(f"fia_bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    print((result.out_dir / "report.md").read_text(encoding="utf-8"))
    counts = result.counts
    print(
        f"[fia_bench] {result.out_dir}: generated {counts['images_generated']} images "
        f"({counts['images_cached']} from cache), {counts['erased']} erasures "
        f"({counts['erase_cached']} cached), {counts['seconds_total']:.1f} s"
    )


def default_slots(config: Path) -> set[str]:
    """Config groups the primary config's defaults list names (``experiment: null`` included)."""
    import yaml

    defaults = yaml.safe_load(config.read_text(encoding="utf-8")).get("defaults") or []
    return {
        str(k).removeprefix("optional ")
        for entry in defaults
        if isinstance(entry, dict)
        for k in entry
    }


def check_overrides(argv: list[str]) -> None:
    """Hydra reports an unknown config option or key as a multi-line trace; catch both first and
    name the valid choices and the nearest one, as for every other bad input."""
    conf = Path(CONFIG_DIR)
    slots = default_slots(conf / "config.yaml")
    selections, settings = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.startswith("+") and key[1:] in slots:
            raise FiaBenchError(
                f"'{arg}': {key[1:]} has a slot in the defaults already; write {arg[1:]}"
            )
        if not sep or key.startswith(("+", "~", "hydra.", "-")):
            continue
        if (conf / key).is_dir():
            group = conf / key  # nested options are named by their path: experiment=fia/table1
            options = sorted(
                p.relative_to(group).with_suffix("").as_posix() for p in group.rglob("*.yaml")
            )
            for option in value.strip("[]").split(","):
                option = option.strip()
                if option and option != "null" and option not in options:
                    raise unknown_choice(key, option, options, f"{key}=")
            selections.append(
                arg if "," not in value or value.startswith("[") else f"{key}={value.split(',')[0]}"
            )
        else:
            settings.append(key)
    if not settings:
        return
    from omegaconf import DictConfig, OmegaConf

    from fia_bench import compose

    cfg = compose(selections)
    for key in settings:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf not in node:
            prefix = f"{parent}." if parent else ""
            raise unknown_choice(
                "config key",
                key,
                [prefix + str(k) for k in node],
                "the command line (add a key with +key=value)",
            )


DRY_RUN = "--dry-run"
MULTIRUN = ("-m", "--multirun")


def run_dir_from_out_dir(argv: list[str]) -> list[str]:
    """A single run given ``out_dir=`` runs in it: Hydra would otherwise also create (and leave
    empty but for its ``.hydra`` files) a dated ``outputs/<date>/<time>/`` folder."""
    if any(a in MULTIRUN for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    out_dirs = [a.partition("=")[2] for a in argv if a.startswith("out_dir=")]
    return [*argv, f"hydra.run.dir={out_dirs[-1]}"] if out_dirs else argv


def main() -> None:
    sys.argv[1:] = run_dir_from_out_dir(sys.argv[1:])
    argv = sys.argv[1:]
    if DRY_RUN in argv:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before any hub import: a plan never downloads
    try:
        check_overrides(argv)
        if DRY_RUN in argv:
            flags = [a for a in argv if a.startswith("-") and a not in (DRY_RUN, *MULTIRUN)]
            if flags:
                raise FiaBenchError(f"{DRY_RUN} takes overrides and -m only, not {flags[0]}")
            from hydra.errors import HydraException

            from fia_bench.plan import dry_run

            overrides = [a for a in argv if not a.startswith("-")]
            try:
                print(dry_run(overrides, multirun=any(a in MULTIRUN for a in argv)), end="")
            except HydraException as err:  # composition errors, in one line as elsewhere
                raise FiaBenchError(str(err).splitlines()[0]) from err
            return
    except FiaBenchError as err:
        print(f"fia_bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra_entry()
