"""The contracts a plugin implements: a method edits weights, an evaluator scores images, a prompt
dataset turns a task into rows. Everything else (caching, seeding, records) is the harness's job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fia_bench.errors import FiaBenchError
from fia_bench.schema import Schema

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from fia_bench.cache import Cache
    from fia_bench.engine import Engine
    from fia_bench.guidance import Guidance

PROMPT_COLUMNS = ("case_id", "prompt", "evaluation_seed", "concept", "role")


@dataclass(frozen=True)
class Task:
    """An ordered concept list of one world; the first ``n`` concepts are erased, the rest kept."""

    name: str
    world: str
    concepts: tuple[str, ...]
    templates: tuple[str, ...]
    source: str
    superclasses: dict[str, str] = field(default_factory=dict)
    # the family (objects | styles | explicit) whose per-task settings the methods apply: a task
    # file's `kind:` (a held-out or larger object set is still objects), else the task's name
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", self.name)

    def split(self, n_concepts: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.concepts[:n_concepts], self.concepts[n_concepts:]


def _no_base_images(*_: Any, **__: Any) -> list[Image.Image]:
    """Outside a harness run there is no image cache to take base-model images from."""
    raise FiaBenchError(
        "base_images is provided by the harness; pass one to EraseRequest to "
        "call a method outside a run"
    )


@dataclass
class EraseRequest:
    """What a method is asked to erase, and the tools it may use to do it.

    ``engine`` samples with the weights as they are now (the model being edited);
    ``base_images(prompts, seeds, negative_prompts=None)`` returns the *unedited* model's images
    through the generate stage's cache, so training data is made once and shared with evaluation.
    ``task.superclasses`` maps concepts to their anchor concept where the task defines one.
    A sequential method may be handed weights that already carry the erasure of its first
    ``done`` targets (the cached erasure of a smaller concept count), with ``prior``, the info
    that erasure returned; it erases the rest (``pending``) and reports all of them.
    """

    targets: tuple[str, ...]
    retain: tuple[str, ...]
    seed: int
    task: Task
    engine: Engine
    base_images: Callable[..., list[Image.Image]] = _no_base_images
    done: int = 0
    prior: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> tuple[str, ...]:
        """The targets the weights do not carry yet: all of them unless resumed."""
        return self.targets[self.done :]


class Method:
    """Edits the pipeline's weights in place; the harness diffs, validates and stores the change.

    Subclasses take their config values as keyword arguments and return from ``erase`` a small
    JSON-able dict describing what they did (counts, losses), which goes into the run's records.
    ``SETTINGS`` declares those keyword arguments with their types and ranges (``schema.py``): the
    whole configuration is checked against it before any model loads. An inference-time method
    (SLD, SAFREE) changes sampling instead of, or besides, weights: its ``sampling_guidance``
    returns what the engine applies at every denoising step of the job's images
    (``guidance.py``).

    ``version`` enters the erase cache key once it is not 0: bump it when the same settings
    come to make another edit, so that stored edits of the old code are not taken for new ones.
    A ``sequential`` method erases its targets one after another, each from the weights the
    previous ones left, and draws nothing that depends on how many targets follow (nor from
    torch's global generator). The erasure of a task's first k targets is then the start of the
    erasure of its first n, so the harness resumes an n-concept erasure from the longest cached
    shorter one (``EraseRequest.done``): a sweep over concept counts trains each concept once
    per seed."""

    SETTINGS: ClassVar[Schema] = Schema()
    version: ClassVar[int] = 0
    sequential: ClassVar[bool] = False

    def __init__(self, **settings: Any) -> None:
        if settings:
            raise TypeError(f"{type(self).__name__} takes no settings, got {sorted(settings)}")

    def erase(self, request: EraseRequest) -> dict[str, Any]:
        raise NotImplementedError

    def sampling_guidance(self, targets: tuple[str, ...], task: Task) -> Guidance | None:
        """The change to sampling every image of the job is made with (its identity enters the
        image keys); none by default. Settings and texts only: it is made without the model."""
        return None

    @classmethod
    def input_fingerprint(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Content hashes of the files the settings name (``checkpoint``'s weights), added to
        the erase cache key so that a file replaced in place is a new edit; none by default."""
        return {}


@dataclass(frozen=True)
class EvalContext:
    """What an evaluator needs to know about the run beyond its own settings.

    ``base_images(prompts, seeds)`` gives the unedited model's images (FID against the base
    model); ``cache`` stores derived reference data (feature statistics of a reference folder).
    """

    task: Task
    judges: dict[str, Any]
    device: str
    base_images: Callable[..., list[Image.Image]] = _no_base_images
    cache: Cache | None = None


@dataclass(frozen=True)
class Score:
    """One measured value; ``prompt_id`` is '*' for a value of the whole image set (e.g. FID)."""

    prompt_id: str
    metric: str
    value: float


@dataclass
class Evaluator:
    """torchmetrics-style: ``update`` with batches of images, ``compute`` once per image set.

    ``higher_is_better`` declares the direction of every metric the evaluator emits, so reports and
    tests never have to guess it; metrics in ``set_level_metrics`` have one value per image set
    (prompt_id '*'), all others one value per prompt row. Bump ``version`` whenever the scoring
    changes: it is part of the cache key. ``SETTINGS`` declares the ``settings`` it reads.
    """

    context: EvalContext
    settings: dict[str, Any] = field(default_factory=dict)
    roles: list[str] = field(default_factory=list)  # prompt roles it scores; empty: all
    higher_is_better: ClassVar[dict[str, bool]] = {}
    set_level_metrics: ClassVar[frozenset[str]] = frozenset()
    version: ClassVar[str] = "1"
    SETTINGS: ClassVar[Schema] = Schema()

    def __post_init__(self) -> None:
        """Load judges and precompute text features here, once per run."""

    def fingerprint(self) -> dict[str, Any]:
        """Everything besides the images that determines the scores (weights hash included)."""
        return {"settings": self.settings}

    def protocol(self) -> str:
        """The settings a reader needs to compare numbers across papers, written into every row."""
        return ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items()))

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, images: list[Image.Image], rows: pd.DataFrame) -> None:
        raise NotImplementedError

    def compute(self) -> list[Score]:
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        """Raw per-prompt outputs kept beside the scores (e.g. every detection with its score and
        box), so other thresholds or class sets can be recomputed without the images."""
        return {}


class PromptDataset:
    """Turns a task and a forget/retain split into prompt rows (``PROMPT_COLUMNS``; ``role`` is
    ``forget``, ``retain`` or ``quality``).

    ``cache`` is set by the harness before ``rows`` is called: where fetched files are kept.
    ``SETTINGS`` declares the keyword arguments it takes.
    """

    SETTINGS: ClassVar[Schema] = Schema()
    cache: Cache

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def rows(self, task: Task, targets: tuple[str, ...], retain: tuple[str, ...]) -> pd.DataFrame:
        raise NotImplementedError


@dataclass(frozen=True)
class AdversarialPrompt:
    """One attack prompt; ``pre_success`` is the judge's verdict on the clean source prompt when
    the attack checks it first (UnlearnDiffAtk's pre-ASR), else None."""

    case_id: str
    source_prompt: str
    prompt: str
    seed: int
    concept: str
    pre_success: bool | None = None


@dataclass
class AttackRequest:
    """What an attack gets for one erased model.

    ``prompts``: the job's target-concept rows (case_id, prompt, generation_seed, concept).
    ``engine``: samples with the *erased* weights (they are applied for the whole attack).
    ``judge(prompts, seeds, concepts)``: generates with the erased model through the image cache
    and returns the judge's verdict per prompt (the task's detector flags it, or the classifier
    names its concept).
    ``base_images(prompts, seeds)``: the unedited model's images (UnlearnDiffAtk's targets).
    """

    targets: tuple[str, ...]
    task: Task
    seed: int
    prompts: pd.DataFrame
    engine: Engine
    judge: Callable[[list[str], list[int], list[str]], list[bool]]
    base_images: Callable[..., list[Image.Image]] = _no_base_images


class Attack:
    """Red-teams an erased model: returns adversarial prompts, whose images the harness then
    generates with that model and judges; the success rate is the attack's ASR. ``SETTINGS``
    declares the keyword arguments it takes."""

    SETTINGS: ClassVar[Schema] = Schema()

    def __init__(self, **settings: Any) -> None:
        if settings:
            raise TypeError(f"{type(self).__name__} takes no settings, got {sorted(settings)}")

    def attack(self, request: AttackRequest) -> list[AdversarialPrompt]:
        raise NotImplementedError
