"""``python -m fia_bench`` / ``fia-bench``: Hydra composes the config, the runner does the work.

Bad input ends with one line on stderr and exit code 2; everything computed before the error
stays in the cache."""

from __future__ import annotations

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


def check_overrides(argv: list[str]) -> None:
    """Hydra reports an unknown config option or key as a multi-line trace; catch both first and
    name the valid choices and the nearest one, as for every other bad input."""
    conf = Path(CONFIG_DIR)
    selections, settings = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith(("+", "~", "hydra.", "-")):
            continue
        if (conf / key).is_dir():
            options = sorted(p.stem for p in (conf / key).glob("*.yaml"))
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


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
    except FiaBenchError as err:
        print(f"fia_bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra_entry()
