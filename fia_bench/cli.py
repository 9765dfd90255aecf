"""``python -m fia_bench`` / ``fia-bench``: Hydra composes the config, the runner does the work.

``--dry-run`` (anywhere on the line, with or without ``-m``) is taken off before Hydra sees the
arguments: it prints what the job or the recipe's sweep would erase, generate and score, the
cache hits and the projected GPU-hours (``fia_bench/plan.py``), and does nothing else.

Bad input ends with one line on stderr and exit code 2; everything computed before the error
stays in the cache. An unexpected error ends with one line naming a log file that holds the full
trace, exit code 1.

Nothing on the command line or in a local config runs code: configs pick plugins by registry
name, and ``_target_`` (Hydra's import-path instantiation), ``hydra.callbacks`` and the flags
that add config folders are refused before Hydra sees them. Config folders beyond ``conf/`` (the
plugin packages', ``hydra.searchpath=[...]``) are checked for the same keys (``plugins.py``).

``python -m fia_bench plugins`` lists every registered plugin, the module its code comes from and
the config that selects it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig

from fia_bench.errors import FiaBenchError, crash_line, unknown_choice
from fia_bench.plugins import (
    SEARCHPATH,
    ConfigSource,
    config_sources,
    group_options,
    refuse_code,
    refuse_code_in,
    with_searchpath,
)
from fia_bench.resources import config_dir


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fia_bench.runner import run

    try:
        result = run(cfg, preset=HydraConfig.get().runtime.choices.get("preset"))
    except FiaBenchError as err:
        print(f"fia_bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        print(f"fia_bench: {crash_line(err, Path(str(cfg.out_dir)))}", file=sys.stderr)
        sys.exit(1)
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


def check_local_configs(conf: Path) -> None:
    """conf/local/ holds hand-written machine settings (git-ignored, never reviewed): refuse the
    keys that would run code, as on the command line."""
    refuse_code_in(sorted((conf / "local").rglob("*.yaml")), "local configs set values")


def parse_error(overrides: list[str]) -> None:
    """Hydra's grammar errors are several lines; name the override that fails in one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as err:
            raise FiaBenchError(
                f"'{arg}' is not a valid override ({str(err).splitlines()[0]}); write key=value, "
                "lists as key=[a,b], strings with spaces in quotes"
            ) from err


def check_overrides(argv: list[str]) -> None:
    """Hydra reports an unknown config option or key as a multi-line trace; catch both first and
    name the valid choices and the nearest one, as for every other bad input. Overrides and local
    configs that would run code are refused first. Options are looked up in every folder Hydra
    will read: our conf/, the user's hydra.searchpath and the plugin packages' configs."""
    conf = config_dir()
    refuse_code(argv)
    check_local_configs(conf)
    # only key=value words: flags take values of their own (--cfg job)
    parse_error([a for a in argv if "=" in a and not a.startswith("-")])
    sources = config_sources(argv)
    slots = default_slots(conf / "config.yaml")
    selections = [a for a in argv if a.partition("=")[0].lstrip("+") == SEARCHPATH]
    settings = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.startswith("+") and key[1:] in slots:
            raise FiaBenchError(
                f"'{arg}': {key[1:]} has a slot in the defaults already; write {arg[1:]}"
            )
        if not sep or key.startswith(("+", "~", "hydra.", "-")):
            continue
        options = group_options(sources, key)  # nested by their path: experiment=fia/table1
        if options is not None:
            chosen = [o.strip() for o in value.strip("[]").split(",")]
            swept = len(chosen) > 1 and not value.startswith("[")
            if swept and "null" in chosen:
                raise FiaBenchError(
                    f"'{arg}': Hydra cannot sweep a config group over null; run the null case "
                    f"as its own command, without {key}=, and merge the two with fia_bench.report"
                )
            for option in chosen:
                if option and option != "null" and option not in options:
                    raise unknown_choice(key, option, options, f"{key}=")
            selections.append(f"{key}={chosen[0]}" if swept else arg)
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


# the groups a user picks from (preset_caps, task_prompts, and the recipes' building blocks
# experiment/arm and experiment/parts are pulled in by other configs); --help lists their options
USER_GROUPS = {
    "model": "the world: the mini world, Stable Diffusion, or tiny random weights for tests",
    "method": "the unlearning method (none: the unedited model, the reference)",
    "task": "ordered concept list and prompts: the first n_concepts are erased",
    "evaluator": "one or several: evaluator=[clip_accuracy,clip_score]",
    "attack": "red-team attacks on the erased model: attack=[prompt_replay]",
    "sampler": "scheduler, steps and guidance of generation",
    "logger": "where results go besides the run directory's files",
    "preset": "preset=smoke: the smallest meaningful run; preset=mini: settings tuned on held-out "
    "classes",
    "experiment": "paper-table recipes (their plan: -m experiment=<recipe> --dry-run)",
}
INTERNAL_GROUPS = ("experiment/arm", "experiment/parts")
HELP_KEYS = (
    "seeds=N or [0,3,7]  n_concepts=N or [1,5,10]  concepts=[a,b]  reference=none\n"
    "  seed_policy=erase_and_generate|erase  device=cpu|cuda  precision=fp32|fp16|bf16\n"
    "  out_dir=DIR  cache_dir=DIR  method.settings.<key>=VALUE (each method's own settings)"
)


def user_options(sources: list[ConfigSource], group: str) -> list[str]:
    """A group's options over every config source, less the recipe building blocks."""
    return [
        name
        for name in group_options(sources, group) or []
        if not any(f"{group}/{name}".startswith(f"{i}/") for i in INTERNAL_GROUPS)
    ]


def help_text() -> str:
    """``--help``: the project, how to call it, and the config groups a user picks from."""
    import textwrap

    sources = config_sources(sys.argv[1:])
    lines = [
        "fia_bench: a reproducible benchmark harness for concept unlearning in text-to-image "
        "diffusion models",
        "",
        "usage: python -m fia_bench [-m] [--dry-run] [group=option ...] [key=value ...]",
        "       (fia-bench is the same command; -m sweeps comma-separated values)",
        "",
        "config groups (group=option):",
    ]
    for group, what in USER_GROUPS.items():
        options = ", ".join(user_options(sources, group))
        lines += [f"  {group}: {what}"]
        lines += textwrap.wrap(options, 96, initial_indent="      ", subsequent_indent="      ")
    lines += [
        "",
        "keys:",
        f"  {HELP_KEYS}",
        "",
        "merge runs: python -m fia_bench.report <run or sweep dirs>/* --out DIR",
        "also: python -m fia_bench.compare (paper tables), .export (erased model out), "
        ".explicit (detections under each paper's rule)",
        "the composed config: --cfg job; Hydra's own flags: --hydra-help; README.md explains all",
    ]
    return "\n".join(lines)


DRY_RUN = "--dry-run"
MULTIRUN = ("-m", "--multirun")


def run_dir_from_out_dir(argv: list[str]) -> list[str]:
    """A single run given ``out_dir=`` runs in it: Hydra would otherwise also create (and leave
    empty but for its ``.hydra`` files) a dated ``outputs/<date>/<time>/`` folder."""
    if any(a in MULTIRUN for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    out_dirs = [a.partition("=")[2] for a in argv if a.startswith("out_dir=")]
    return [*argv, f"hydra.run.dir={out_dirs[-1]}"] if out_dirs else argv


PLUGINS = "plugins"


def main() -> None:
    sys.argv[1:] = run_dir_from_out_dir(sys.argv[1:])
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return
    if DRY_RUN in argv:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before any hub import: a plan never downloads
    try:
        if argv[:1] == [PLUGINS]:
            from fia_bench.plugins import plugin_table

            extra = [a for a in argv[1:] if a.partition("=")[0].lstrip("+") != SEARCHPATH]
            if extra:
                raise FiaBenchError(f"{PLUGINS} takes only {SEARCHPATH}=[...], not {extra[0]}")
            print(plugin_table(argv[1:]), end="")
            return
        check_overrides(argv)
        if DRY_RUN in argv:
            flags = [a for a in argv if a.startswith("-") and a not in (DRY_RUN, *MULTIRUN)]
            if flags:
                raise FiaBenchError(f"{DRY_RUN} takes overrides and -m only, not {flags[0]}")
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
    except HydraException as err:  # composition errors: the first line says what is wrong
        print(f"fia_bench: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        print(f"fia_bench: {crash_line(err, None)}", file=sys.stderr)
        sys.exit(1)
    sys.argv[1:] = with_searchpath(argv)  # the plugin packages' configs, as the check saw them
    hydra_entry()
