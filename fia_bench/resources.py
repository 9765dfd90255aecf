"""Where the files the harness reads at run time live, for every way it can be installed.

In a source checkout (plain, or an editable install) the configs, the recipes' data and the plugin
folders sit at the top of the repository beside ``fia_bench/``: ``conf/``, ``experiments/``,
``methods/``, ``evaluators/``, ``datasets/``. A wheel carries them inside the package
(``fia_bench/conf/``, ``fia_bench/experiments/``, ``fia_bench/methods/`` …; pyproject.toml maps
them). Every module asks here, so both layouts find the same files. This module imports nothing
from the package: it is the bottom of the import graph."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The source checkout this package runs from, or None for an installed wheel."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file():
        return root
    return None


def shipped(relative: str) -> Path:
    """A file or folder the harness ships, named by its path in the repository (``conf``,
    ``experiments/paper_tables``, ``datasets/data``) or inside the package
    (``miniworld/weights/pipeline``), whether or not it exists."""
    root = checkout_root()
    top = relative.split("/", 1)[0]
    if root is not None and not (PACKAGE_DIR / top).exists():
        return root / relative
    return PACKAGE_DIR / relative


def config_dir() -> Path:
    """The folder Hydra's primary config (``config.yaml``) and our config groups live in."""
    return shipped("conf")
