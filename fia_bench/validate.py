"""The whole configuration, checked before any model loads: every top-level key, the sampler,
engine and report sections, each selected plugin's settings against the ``SETTINGS`` its class
declares (``schema.py``), the device and the directories a run writes. A bad value ends in one
line naming the key, the value and what is valid, seconds before the first weight is read
instead of minutes after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fia_bench.engine import AUTO, SCHEDULERS
from fia_bench.errors import FiaBenchError
from fia_bench.models import DTYPES
from fia_bench.registry import ATTACKS, DATASETS, EVALUATORS, METHODS, Registry
from fia_bench.resources import config_dir
from fia_bench.schema import Choice, Dict, Either, Flag, Int, Items, Real, Schema, Text

SEED_POLICIES = ("erase", "erase_and_generate")
LOGGERS = ("files", "wandb")
MAX_SEEDS = 10_000  # a count beyond this is a typo, not a sweep

TOP = Schema(
    seeds=Either(Int(ge=1, le=MAX_SEEDS), Items(Int(ge=0, lt=2**32), min_items=1)),
    n_concepts=Either(Int(ge=1), Items(Int(ge=1), min_items=1)),
    concepts=Items(Text(), min_items=1, null=True),
    retain=Items(Text(), min_items=1, null=True),
    reference=Text(),
    seed_policy=Choice(*SEED_POLICIES),
    device=Text(),
    precision=Choice(*DTYPES),
    out_dir=Text(),
    cache_dir=Text(),
    preset_kind=Choice("caps", null=True),
)
SAMPLER = Schema(
    scheduler=Choice(*SCHEDULERS),
    steps=Int(ge=1),
    guidance_scale=Real(),
    eta=Real(ge=0, le=1),
    batch_size=Int(ge=1),
)
ENGINE = Schema(batch_size=Either(Choice(AUTO), Int(ge=1)), channels_last=Flag(), compile=Flag())
REPORT = Schema(grid_prompts=Int(ge=0), alpha=Real(gt=0, lt=1))
ROLES = ("forget", "retain", "quality")
PLUGIN_NODE = Schema(
    name=Text(), dataset=Text(), settings=Dict(null=True), roles=Items(Choice(*ROLES))
)
MODEL = Schema(
    name=Text(),
    weights=Choice("pretrained", "random"),
    architecture=Text(),
    source=Text(),
    revision=Text(null=True),
    world=Text(),
    detector=Text(null=True),
    fid_features=Text(),
    resolution=Int(ge=8),
    seed=Int(ge=0),
    judges=Dict(Dict()),
)
JUDGE = Schema(evaluator=Text(), metric=Text())


def plain(node: Any) -> dict[str, Any]:
    """A config node as a plain dict (settings are handed to plugins as keyword arguments)."""
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def value(node: Any) -> Any:
    """A config value of any kind as plain Python."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


DETECTOR = "detector"


def selected_evaluators(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Evaluator name → its config. ``detector`` stands for the model world's explicit-content
    judge (``model.detector``: nudenet on SD, hazard_detector on the mini world) with that
    evaluator's shipped config, so one command line serves every world; keys given under
    ``evaluator.detector`` override the shipped ones."""
    selected = {str(k): plain(v) or {} for k, v in (cfg.get("evaluator") or {}).items()}
    if DETECTOR in selected:
        name = str(cfg.model.get("detector") or "")
        if not name:
            raise FiaBenchError(
                f"evaluator=detector: model {cfg.model.name} names no detector (model.detector)"
            )
        if name in selected:
            raise FiaBenchError(
                f"evaluator=[...] selects both detector and {name}, which is model "
                f"{cfg.model.name}'s detector: keep one"
            )
        shipped = OmegaConf.load(config_dir() / "evaluator" / f"{name}.yaml")
        selected[name] = plain(OmegaConf.merge(shipped, selected.pop(DETECTOR)))
    return dict(sorted(selected.items()))


def check_config(cfg: DictConfig, machine: bool = True) -> None:
    """Raise ``FiaBenchError`` on the first bad value of ``cfg``; import no weights. ``machine``:
    also check this machine's side (the device exists, the directories are writable)."""
    try:
        check_values(cfg, machine)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise FiaBenchError(str(err).strip().splitlines()[0]) from err


def check_values(cfg: DictConfig, machine: bool) -> None:
    folders = ("out_dir", "cache_dir")  # a plan's config may not resolve them (Hydra's run dir)
    keys = [k for k in TOP.fields if k in cfg and (machine or k not in folders)]
    TOP.check({k: value(cfg.get(k)) for k in keys}, "")
    seeds = value(cfg.seeds)
    if isinstance(seeds, list) and len(set(seeds)) != len(seeds):
        raise FiaBenchError(f"seeds={seeds}: a seed is listed twice; seeds must be distinct")
    sections = (("model", MODEL), ("sampler", SAMPLER), ("engine", ENGINE), ("report", REPORT))
    for name, schema in sections:
        schema.check(plain(cfg[name]), name)
    logger = str(cfg.logger.get("name"))
    Choice(*LOGGERS).check(logger, "logger.name")
    check_plugin(METHODS, cfg.method, "method")
    check_plugin_name(METHODS, str(cfg.reference), "reference")
    for key in ("prompts", "quality"):
        if cfg.task.get(key):
            check_plugin(DATASETS, cfg.task[key], f"task.{key}", name_key="dataset")
    evaluators = selected_evaluators(cfg)
    for name, node in evaluators.items():
        check_plugin(EVALUATORS, {"name": name, **node}, f"evaluator.{name}")
    for name, node in (plain(cfg.get("attack")) or {}).items():
        judge = node.pop("judge", None) or {}
        JUDGE.check(judge, f"attack.{name}.judge")
        check_plugin(ATTACKS, {"name": name, **node}, f"attack.{name}")
        if judge.get("evaluator") not in evaluators:
            raise FiaBenchError(
                f"attack.{name}.judge.evaluator={judge.get('evaluator')!r}: add it to "
                f"evaluator=[...] (selected: {', '.join(evaluators) or 'none'})"
            )
    if machine:
        check_device(str(cfg.device))
        for key in folders:
            check_writable(key, Path(str(cfg[key])).expanduser())


def check_plugin_name(registry: Registry, name: str, where: str) -> type:
    return registry.get(name, f"{where}=")


def check_plugin(registry: Registry, node: Any, where: str, name_key: str = "name") -> None:
    """A plugin's node: its name in the registry and its settings against the class's
    ``SETTINGS``."""
    node = dict(value(node) or {})
    PLUGIN_NODE.check(node, where)
    plugin = check_plugin_name(registry, str(node.get(name_key)), f"{where}.{name_key}")
    plugin.SETTINGS.check(node.get("settings"), f"{where}.settings")


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, and the GPU exists: a run that would otherwise load its
    weights for a minute before failing fails here."""
    kind, colon, index = device.partition(":")
    if kind == "cpu" and not colon:
        return
    if kind != "cuda" or (colon and not index.isdigit()):
        raise FiaBenchError(f"device={device!r}: valid devices are cpu, cuda and cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise FiaBenchError(
            f"device={device}: CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use device=cpu"
        )
    count = torch.cuda.device_count()
    if colon and int(index) >= count:
        raise FiaBenchError(
            f"device={device}: this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
        )


def check_writable(key: str, folder: Path) -> None:
    """Create ``folder`` if needed and write a probe file of its own into it (ranks of a sharded
    run check one folder at once)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe"):
            pass
    except OSError as err:
        raise FiaBenchError(f"{key}={folder} is not writable: {err.strerror}") from err
