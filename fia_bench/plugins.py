"""Every place a config can come from, and the plugins they configure.

Hydra reads our ``conf/`` first, then each folder on ``hydra.searchpath``: the user's, and one per
installed package that declares its configs with one entry point (the package's ``conf/`` folder)::

    [project.entry-points."fia_bench.configs"]
    my_plugin = "my_plugin"      # my_plugin/conf/method/<name>.yaml, ...

The command-line check, ``fia_bench.compose``, the dry run and Hydra itself see the same list
(``with_searchpath``), so a method a package ships runs with ``method=<name>`` and nothing copied
into this repository. Configs only set values: a folder outside ``conf/`` that names code to import
(``_target_``, ``hydra.callbacks``, ``hydra.searchpath``) is refused as a local config is.
``python -m fia_bench plugins`` prints where each registered plugin's code and config come from."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from fia_bench.errors import FiaBenchError
from fia_bench.registry import declared_entry_points
from fia_bench.resources import config_dir

CONFIG_ENTRY_POINTS = "fia_bench.configs"
SEARCHPATH = "hydra.searchpath"
CODE_KEY = "_target_"
HYDRA_CODE_KEYS = ("callbacks", "searchpath")  # hydra.<these> import code or load more configs
CONFIG_DIR_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp")


@dataclass(frozen=True)
class ConfigSource:
    """A folder of config groups and who provides it (``origin``); ``entry`` is its
    ``hydra.searchpath`` entry, None for our own ``conf/`` (Hydra's primary folder)."""

    path: Path
    origin: str
    entry: str | None = None


def code_keys(node: object, path: str = "") -> list[str]:
    """Paths of ``_target_`` keys, and of hydra.callbacks / hydra.searchpath, in a YAML tree."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, child in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key == CODE_KEY or (path == "hydra" and key in HYDRA_CODE_KEYS):
                found.append(here)
            found += code_keys(child, here)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found += code_keys(child, f"{path}[{i}]")
    return found


def refuse_code_in(files: list[Path], why: str) -> None:
    """One line for the first YAML file that does not parse or that names code to import."""
    import yaml

    for path in files:
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise FiaBenchError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
        found = code_keys(tree)
        if found:
            raise FiaBenchError(
                f"{path}: {found[0]} is refused; {why}, and configs pick plugins by registry "
                "name, never by import path"
            )


def refuse_code(overrides: list[str]) -> None:
    """Refuse overrides that would make Hydra import and call something named by a path. Extra
    config folders come only through ``hydra.searchpath=[...]``, whose files
    ``plugins.config_sources`` checks for the same keys."""
    for arg in overrides:
        key = arg.partition("=")[0].lstrip("+")
        if arg.split("=")[0] in CONFIG_DIR_FLAGS or arg.startswith(
            tuple(f"{f}=" for f in CONFIG_DIR_FLAGS)
        ):
            raise FiaBenchError(
                f"'{arg}': add config folders as {SEARCHPATH}=[file:///path/to/conf] (their "
                "configs are checked); machine settings go in conf/local/default.yaml"
            )
        if key == SEARCHPATH:
            continue
        hydra_code = key.lstrip("~").split(".")[0].split("/")[0] == "hydra" and any(
            word in arg for word in HYDRA_CODE_KEYS
        )
        if CODE_KEY in arg or hydra_code:
            raise FiaBenchError(
                f"'{arg}': configs pick plugins by registry name, never by import path "
                f"({CODE_KEY} and hydra.callbacks are refused; {SEARCHPATH} only as "
                f"{SEARCHPATH}=[...])"
            )


def package_folder(module: str, where: str) -> Path:
    """The folder of an installed package, found without running its code (a top-level one)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise FiaBenchError(f"{where}: cannot find package '{module}' ({err})") from err
    if spec is None:
        raise FiaBenchError(f"{where}: no installed package '{module}'")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(str(spec.origin)).parent


def entry_point_origin(ep: EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


def package_config_sources() -> list[ConfigSource]:
    """The ``conf/`` folder of every package with a ``fia_bench.configs`` entry point."""
    sources = []
    for ep in sorted(declared_entry_points(CONFIG_ENTRY_POINTS), key=lambda e: e.name):
        where = f"entry point {CONFIG_ENTRY_POINTS} '{ep.name} = {ep.value}'"
        folder = package_folder(ep.module, where) / "conf"
        if not folder.is_dir():
            raise FiaBenchError(
                f"{where} ({entry_point_origin(ep)}): no config folder {folder}; a package ships "
                "its configs as <package>/conf/<group>/<name>.yaml (package data)"
            )
        sources.append(ConfigSource(folder, entry_point_origin(ep), f"file://{folder}"))
    return sources


def given_searchpath(overrides: list[str]) -> list[str]:
    """The entries of ``hydra.searchpath=[...]`` on the command line (the last one given)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries: list[str] = []
    for arg in overrides:
        if arg.partition("=")[0].lstrip("+") != SEARCHPATH:
            continue
        value = OverridesParser.create().parse_override(arg).value()
        entries = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return entries


def searchpath_folder(entry: str) -> Path:
    """The folder a ``hydra.searchpath`` entry names (``file://``, ``pkg://`` or a plain path)."""
    scheme, sep, rest = entry.partition("://")
    if not sep:
        scheme, rest = "file", entry
    where = f"{SEARCHPATH} entry '{entry}'"
    if scheme == "file":
        folder = Path(rest).expanduser()
    elif scheme == "pkg":
        head, *tail = rest.replace("/", ".").strip(".").split(".")
        folder = package_folder(head, where).joinpath(*tail)
    else:
        raise FiaBenchError(f"{where}: unknown scheme '{scheme}'; valid choices: file, pkg")
    if not folder.is_dir():
        raise FiaBenchError(f"{where}: {folder} is not a folder")
    return folder


def config_sources(overrides: list[str] | None = None) -> list[ConfigSource]:
    """Our ``conf/``, then the user's ``hydra.searchpath`` folders, then the packages': Hydra's
    order, in which the first folder holding a group's option wins. Every folder but ours is
    checked for keys that name code."""
    # Hydra is handed the folders the check saw (it skips a pkg:// one without __init__.py)
    folders = [searchpath_folder(e).resolve() for e in given_searchpath(list(overrides or []))]
    given = [ConfigSource(f, SEARCHPATH, f"file://{f}") for f in folders]
    sources = [ConfigSource(config_dir(), "fia_bench"), *given, *package_config_sources()]
    for source in sources[1:]:
        why = f"configs from {source.origin} set values"
        refuse_code_in(sorted(source.path.rglob("*.yaml")), why)
    return sources


def quoted(entry: str) -> str:
    escaped = entry.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def with_searchpath(overrides: list[str]) -> list[str]:
    """``overrides`` with one ``hydra.searchpath`` naming every folder beyond our ``conf/``, the
    user's first (unchanged when there is none)."""
    sources = config_sources(overrides)[1:]
    if not sources:
        return list(overrides)
    kept = [a for a in overrides if a.partition("=")[0].lstrip("+") != SEARCHPATH]
    entries = ",".join(quoted(str(s.entry)) for s in sources)
    return [*kept, f"{SEARCHPATH}=[{entries}]"]


def group_options(sources: list[ConfigSource], group: str) -> list[str] | None:
    """The options of a config group over every source (nested ones by their path:
    ``experiment=fia/table1``), or None when no source has the group."""
    folders = [s.path / group for s in sources if (s.path / group).is_dir()]
    if not folders:
        return None
    return sorted(
        {p.relative_to(f).with_suffix("").as_posix() for f in folders for p in f.rglob("*.yaml")}
    )


# ---- python -m fia_bench plugins ---------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """A plugin registry and the config groups whose files select its plugins: (group, the key
    naming the plugin, None for the file name)."""

    label: str
    entry_points: str
    selected_by: tuple[tuple[str, str | None], ...]


KINDS = (
    Kind("method", "fia_bench.methods", (("method", "name"),)),
    Kind("evaluator", "fia_bench.evaluators", (("evaluator", None),)),
    Kind("attack", "fia_bench.attacks", (("attack", None),)),
    # a dataset is also picked on the command line: task.prompts.dataset=<name>
    Kind(
        "dataset", "fia_bench.datasets", (("task", "prompts.dataset"), ("task_prompts", "dataset"))
    ),
)
ALIASES = {"evaluator": {"detector"}}  # model.detector's evaluator, whichever the world's is


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    origin: str
    names: str  # the plugin it selects
    shadowed_by: Path | None = None  # an earlier source holds the same option (Hydra uses that)


def config_files(sources: list[ConfigSource], kind: Kind) -> list[ConfigFile]:
    import yaml

    files: list[ConfigFile] = []
    for group, key in kind.selected_by:
        seen: dict[str, Path] = {}
        for source in sources:
            folder = source.path / group
            for path in sorted(folder.rglob("*.yaml")):
                tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                if set(tree) <= {"defaults"}:
                    continue  # a bundle of other options (attack=all)
                node: Any = tree
                for part in key.split(".") if key else []:
                    node = node.get(part) if isinstance(node, dict) else None
                option = path.relative_to(folder).with_suffix("").as_posix()
                name = option if key is None else str(node)
                files.append(ConfigFile(path, source.origin, name, seen.get(option)))
                seen.setdefault(option, path)
    return files


def shown(path: Path) -> str:
    ours = config_dir()
    return f"conf/{path.relative_to(ours).as_posix()}" if path.is_relative_to(ours) else str(path)


def plugin_rows(sources: list[ConfigSource]) -> tuple[list[tuple[str, ...]], list[str]]:
    """One row per registered plugin and per config that selects no plugin, and the problems."""
    from fia_bench.registry import ATTACKS, DATASETS, EVALUATORS, METHODS

    registries = {r.entry_point_group: r for r in (METHODS, EVALUATORS, ATTACKS, DATASETS)}
    rows, problems = [], []
    for kind in KINDS:
        registry = registries[kind.entry_points]
        dists = {ep.name: entry_point_origin(ep) for ep in declared_entry_points(kind.entry_points)}
        files = config_files(sources, kind)
        for name in registry.names():
            module = registry.source(name).partition(":")[0]
            code = f"{module} ({dists.get(name, 'registered in code')})"
            used = [f for f in files if f.names == name and f.shadowed_by is None]
            config = "; ".join(f"{shown(f.path)} ({f.origin})" for f in used)
            if not used:
                groups = " or ".join(f"conf/{group}/" for group, _ in kind.selected_by)
                config = f"NO CONFIG: nothing in {groups} selects it"
                if kind.label != "dataset":  # task.prompts.dataset=<name> picks any dataset
                    problems.append(f"{kind.label} '{name}' ({code}) has no config")
            rows.append((kind.label, name, code, config))
        for f in files:
            if f.shadowed_by is not None:
                problems.append(f"{f.path} ({f.origin}) is not used: {shown(f.shadowed_by)} wins")
            elif f.names not in registry.names() and f.names not in ALIASES.get(kind.label, ()):
                rows.append((kind.label, f.names, "NO PLUGIN", f"{shown(f.path)} ({f.origin})"))
                problems.append(
                    f"{shown(f.path)} ({f.origin}) names {kind.label} '{f.names}', which no "
                    f"{kind.entry_points} entry point registers"
                )
    return rows, problems


def plugin_table(overrides: list[str] | None = None) -> str:
    """What ``python -m fia_bench plugins [hydra.searchpath=[...]]`` prints."""
    sources = config_sources(overrides)
    rows, problems = plugin_rows(sources)
    header = ("group", "name", "code (package)", "config (source)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]])
        for r in [header, *rows]
    ]
    lines += ["", "config folders, first wins:"]
    lines += [f"  {s.path} ({s.origin})" for s in sources]
    lines += ["", f"{len(problems)} problem(s)" + (":" if problems else "")]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines) + "\n"
