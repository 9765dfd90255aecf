"""fia_bench: a reproducible benchmark harness for concept unlearning in text-to-image models.

Python use (same code path as the command line)::

    import fia_bench
    result = fia_bench.run(["method=none", "seeds=2"], out_dir="runs/demo")
    result.summary          # pandas DataFrame, mean ± std over seeds
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fia_bench.resources import checkout_root, config_dir, shipped

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from fia_bench.api import Method
    from fia_bench.runner import RunResult

__all__ = ["compose", "run"]
__version__ = "0.1.0"

# In a source checkout the plugin folders (methods/, evaluators/, datasets/) sit beside this
# package, not inside it; listing the checkout here resolves fia_bench.methods and the rest to the
# same checkout as fia_bench itself. Without it an editable install's import hook maps them to the
# checkout it was installed from, whichever checkout fia_bench was imported from.
_checkout = checkout_root()
if _checkout is not None:
    __path__.append(str(_checkout))


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    # configs name shipped files as ${fia_bench_path:miniworld/weights/pipeline}, wherever the
    # package is installed
    if not OmegaConf.has_resolver("fia_bench_path"):
        OmegaConf.register_new_resolver("fia_bench_path", lambda relative: str(shipped(relative)))


_register_resolvers()


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the command line would build from the same overrides (refused alike when
    they name code to import: ``plugins.refuse_code``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fia_bench.plugins import refuse_code, with_searchpath

    refuse_code(list(overrides or []))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=with_searchpath(overrides or []))


def run(
    overrides: list[str] | None = None,
    out_dir: str | None = None,
    method: Method | None = None,
    pipeline: Any = None,
) -> RunResult:
    """Run one job from Python; ``out_dir`` replaces Hydra's dated run directory.

    ``method``: a ``Method`` object to evaluate instead of ``method=`` (its job is named by its
    class, lower-cased; its erase cache key by its class and attributes). ``pipeline``: an
    already-loaded ``StableDiffusionPipeline`` to use instead of loading ``model=`` (the config
    still names its world, resolution and judges), as lm-evaluation-harness's
    ``simple_evaluate`` takes a model object."""
    from omegaconf import open_dict

    from fia_bench.runner import run as run_config

    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.out_dir = out_dir or "outputs/python"
    presets = [o.partition("=")[2] for o in overrides or [] if o.partition("=")[0] == "preset"]
    preset = presets[-1] if presets and presets[-1] != "null" else None
    return run_config(cfg, method, pipeline, preset)
