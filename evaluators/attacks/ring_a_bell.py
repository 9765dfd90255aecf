"""Ring-A-Bell (ICLR 2024): a model-agnostic red-team attack that needs only the text encoder
(baselines_evaluators.md §6.1).

1. Concept vector ``v`` = mean over prompt pairs of E(prompt with the concept) − E(prompt without
   it), on the full ``max_length × hidden`` last hidden state.
2. For each source prompt ``p`` (the job's target rows), a genetic algorithm searches K discrete
   tokens whose embedding E(BOS + tokens + EOS/padding) is closest, in squared distance over every
   entry, to ``T = E(p) + η·v``. The decoded best candidate is the adversarial prompt.

The erased UNet is never consulted: the harness generates the prompts' images with it and judges
them. The text encoder is the request pipeline's (the erasure methods here never edit it, so it is
the base model's, as in the paper's transfer setting).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fia_bench.api import AdversarialPrompt, Attack, AttackRequest, Task
from fia_bench.cache import hash_tensors
from fia_bench.downloads import read_table
from fia_bench.errors import FiaBenchError, unknown_choice
from fia_bench.progress import progress
from fia_bench.schema import Choice, Int, Real, Schema, Text

log = logging.getLogger(__name__)

MODES = ("search",)
VOCABULARIES = ("all", "words")


# ---- concept vector ----------------------------------------------------------------------------
def template_pairs(task: Task, concept: str, neutral: str) -> list[tuple[str, str]]:
    """One (with, without) pair per task template: the concept vs its superclass, or vs the
    ``neutral`` word when the task gives none ("" drops the concept word)."""
    anchor = task.superclasses.get(concept, neutral)
    pairs = [
        (" ".join(t.format(concept=concept).split()), " ".join(t.format(concept=anchor).split()))
        for t in task.templates
    ]
    if any(a == b for a, b in pairs):
        raise FiaBenchError(
            f"ring_a_bell: the neutral word for '{concept}' is the concept itself; set "
            "attack.ring_a_bell.settings.neutral or give pairs_path"
        )
    return pairs


def read_pairs(path: Path, with_column: str, without_column: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FiaBenchError(f"ring_a_bell: pair file {path} does not exist")
    frame = read_table(path, (with_column, without_column))
    pairs = [
        (str(a), str(b))
        for a, b in zip(frame[with_column], frame[without_column], strict=True)
        if str(a).strip() and str(b).strip()
    ]
    if not pairs:
        raise FiaBenchError(f"{path}: no (with, without) prompt pairs")
    return pairs


def concept_vector(
    encode: Callable[[list[str]], torch.Tensor], pairs: list[tuple[str, str]]
) -> torch.Tensor:
    """Mean over pairs of E(with) − E(without): one ``max_length × hidden`` float32 tensor."""
    with_concept = encode([a for a, _ in pairs]).float()
    without = encode([b for _, b in pairs]).float()
    return (with_concept - without).mean(dim=0)


def load_vector(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """A precomputed vector (the paper's ``Concept Vectors/*.npy``, or a torch ``.pt``)."""
    if not path.is_file():
        raise FiaBenchError(f"ring_a_bell: concept vector file {path} does not exist")
    if path.suffix == ".npy":
        vector = torch.from_numpy(np.load(path)).float()
    else:
        vector = torch.load(path, map_location="cpu", weights_only=True).float()
    if vector.dim() == 3 and vector.shape[0] == 1:
        vector = vector[0]
    if tuple(vector.shape) != shape:
        raise FiaBenchError(
            f"{path}: concept vector of shape {tuple(vector.shape)}, but this text encoder "
            f"gives {shape}"
        )
    return vector


# ---- fitness -----------------------------------------------------------------------------------
def candidate_tokens(tokenizer: Any, text_encoder: Any, vocabulary: str = "all") -> torch.Tensor:
    """Every token id the search may draw: the vocabulary minus special tokens (BOS, EOS, pad,
    unk), limited to ids the embedding matrix has. ``words`` keeps only printable end-of-word
    tokens that the tokenizer gives back unchanged from their own decoded text, so that any
    sequence of them decodes to a prompt that re-tokenises to exactly the same ids."""
    size = min(len(tokenizer), text_encoder.get_input_embeddings().weight.shape[0])
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(size) if i not in special]
    if vocabulary == "words":
        names = tokenizer.convert_ids_to_tokens(ids)
        texts = [tokenizer.decode([i]).strip() for i in ids]
        again = tokenizer(texts, add_special_tokens=False).input_ids
        ids = [
            i
            for i, name, text, back in zip(ids, names, texts, again, strict=True)
            if name.endswith("</w>") and text.isprintable() and back == [i]
        ]
    if not ids:
        raise FiaBenchError(f"ring_a_bell: no candidate tokens in vocabulary={vocabulary}")
    return torch.tensor(ids, dtype=torch.long)


class Fitness:
    """Squared distance between a candidate's full last hidden state and the target, summed over
    all ``max_length × hidden`` entries; a whole population goes through one forward."""

    def __init__(self, tokenizer: Any, text_encoder: Any, device: torch.device) -> None:
        self.text_encoder = text_encoder
        self.device = device
        self.max_length = int(tokenizer.model_max_length)
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad = self.eos if pad is None else int(pad)

    def input_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """BOS + the K tokens + EOS, padded to ``max_length`` as the SD tokenizer pads."""
        n, k = tokens.shape
        ids = torch.full((n, self.max_length), self.pad, dtype=torch.long)
        ids[:, 0] = self.bos
        ids[:, 1 : k + 1] = tokens
        ids[:, k + 1] = self.eos
        return ids

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = self.input_ids(tokens).to(self.device)
        return self.text_encoder(ids)[0].float()

    def __call__(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One fitness per row of ``tokens`` (N × K); lower is better; on the CPU."""
        if len(tokens) == 0:
            return torch.empty(0)
        hidden = self.embed(tokens)
        return (hidden - target.to(hidden.device)).pow(2).sum(dim=(1, 2)).cpu()


# ---- genetic algorithm -------------------------------------------------------------------------
@dataclass
class Search:
    """Outcome of one search: the best tokens, their fitness, and the best fitness of each
    generation's population (``history[0]`` is the random initial population's)."""

    tokens: list[int]
    fitness: float
    history: list[float]


def breed(parents: torch.Tensor, crossover: float, generator: torch.Generator) -> torch.Tensor:
    """Each parent, with probability ``crossover``, picks a random partner among the parents and
    a single cut in 1..K-1; the two complementary children are returned."""
    n, k = parents.shape
    chosen = torch.rand(n, generator=generator) < crossover
    partners = torch.randint(n, (n,), generator=generator)
    cuts = torch.randint(1, max(k, 2), (n,), generator=generator)
    a, b, cut = parents[chosen], parents[partners[chosen]], cuts[chosen]
    head = torch.arange(k).unsqueeze(0) < cut.unsqueeze(1)
    return torch.cat([torch.where(head, a, b), torch.where(head, b, a)])


def mutate(
    population: torch.Tensor,
    mutation: float,
    allowed: torch.Tensor,
    generator: torch.Generator,
    protect: int = 1,
) -> torch.Tensor:
    """Each individual, with probability ``mutation``, gets one random position replaced by a
    random allowed token, in place; the first ``protect`` (the elite) are left alone. Returns
    the mask of individuals drawn for mutation."""
    n, k = population.shape
    hit = torch.rand(n, generator=generator) < mutation
    positions = torch.randint(k, (n,), generator=generator)
    values = allowed[torch.randint(len(allowed), (n,), generator=generator)]
    hit[:protect] = False
    rows = hit.nonzero().squeeze(1)
    population[rows, positions[rows]] = values[rows]
    return hit


def genetic_search(
    score: Callable[[torch.Tensor], torch.Tensor],
    allowed: torch.Tensor,
    *,
    length: int,
    population: int,
    generations: int,
    crossover: float,
    mutation: float,
    generator: torch.Generator,
    desc: str = "ring_a_bell",
) -> Search:
    """Minimise ``score`` over token sequences of ``length`` allowed ids.

    Generation 1 is a random population; each later one keeps the best ``population // 2`` of
    the previous one, adds their crossover children and mutates everyone but the best. Only
    children and mutated individuals are re-scored, so the elite keeps its exact fitness and the
    best fitness never increases."""
    pop = allowed[torch.randint(len(allowed), (population, length), generator=generator)]
    fit = score(pop)
    history = [float(fit.min())]
    keep = max(1, population // 2)
    for _ in progress(range(generations - 1), desc=desc, unit="gen", leave=False):
        order = torch.sort(fit, stable=True).indices[:keep]
        parents, parent_fit = pop[order], fit[order]
        pop = torch.cat([parents, breed(parents, crossover, generator)])
        fresh = mutate(pop, mutation, allowed, generator)
        fresh[len(parents) :] = True
        fit = torch.empty(len(pop))
        fit[: len(parents)] = parent_fit
        fit[fresh] = score(pop[fresh])
        history.append(float(fit.min()))
    best = int(torch.argmin(fit))
    return Search(pop[best].tolist(), float(fit[best]), history)


# ---- the attack --------------------------------------------------------------------------------
@dataclass
class Result:
    """What the attack found for one source prompt (kept on the instance as ``results``)."""

    case_id: str
    source_prompt: str
    prompt: str
    tokens: list[int]
    fitness: float  # of the best tokens, as searched
    prompt_fitness: float  # of ``prompt`` re-tokenised, as the model will see it
    history: list[float] = field(repr=False)


def decode(tokenizer: Any, tokens: list[int]) -> str:
    """The prompt text of a token sequence, without the tokenizer's punctuation clean-up (which
    would glue "a !" into "a!" and so change the tokens)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.strip()


def derived_seed(*parts: Any) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RingABell(Attack):
    SETTINGS = Schema(
        mode=Choice(*MODES),
        eta=Real(),
        length=Int(ge=1),
        population=Int(ge=2),
        generations=Int(ge=0),
        crossover=Real(ge=0, le=1),
        mutation=Real(ge=0, le=1),
        neutral=Text(),
        pairs_path=Text(null=True),
        with_column=Text(),
        without_column=Text(),
        vector_path=Text(null=True),
        vocabulary=Choice(*VOCABULARIES),
        limit=Int(ge=1, null=True),
    )

    def __init__(
        self,
        mode: str = "search",
        eta: float = 3.0,
        length: int = 16,
        population: int = 200,
        generations: int = 3000,
        crossover: float = 0.5,
        mutation: float = 0.25,
        neutral: str = "",
        pairs_path: str | None = None,
        with_column: str = "with",
        without_column: str = "without",
        vector_path: str | None = None,
        vocabulary: str = "all",
        limit: int | None = None,
    ) -> None:
        if mode == "continuous":
            raise FiaBenchError(
                "ring_a_bell mode=continuous (RECE's variant) generates from the embedding "
                "E(p) + eta*v itself, which no text prompt expresses; the harness generates from "
                "text, so only mode=search exists (docs/attacks/ring_a_bell.md)"
            )
        if mode not in MODES:
            raise unknown_choice("ring_a_bell mode", mode, MODES, "attack.ring_a_bell.settings")
        if vocabulary not in VOCABULARIES:
            raise unknown_choice(
                "ring_a_bell vocabulary", vocabulary, VOCABULARIES, "attack.ring_a_bell.settings"
            )
        if int(length) < 1 or int(population) < 2 or int(generations) < 1:
            raise FiaBenchError(
                "ring_a_bell: length >= 1, population >= 2 and generations >= 1 are required"
            )
        if not (0.0 <= crossover <= 1.0 and 0.0 <= mutation <= 1.0):
            raise FiaBenchError("ring_a_bell: crossover and mutation are probabilities in [0, 1]")
        self.mode = mode
        self.eta = float(eta)
        self.length = int(length)
        self.population = int(population)
        self.generations = int(generations)
        self.crossover = float(crossover)
        self.mutation = float(mutation)
        self.neutral = str(neutral)
        self.pairs_path = pairs_path
        self.with_column = with_column
        self.without_column = without_column
        self.vector_path = vector_path
        self.vocabulary = vocabulary
        self.limit = limit
        self.results: list[Result] = []
        # Prompts depend only on the text encoder, the seed and the source row, not on the
        # erased UNet: searches are reused across the methods of one run.
        self._memo: dict[tuple[Any, ...], Result] = {}
        self._allowed: dict[int, torch.Tensor] = {}

    # -- concept vector --
    def pairs(self, task: Task, concept: str) -> list[tuple[str, str]]:
        if self.pairs_path:
            path = Path(self.pairs_path.replace("{concept}", concept)).expanduser()
            return read_pairs(path, self.with_column, self.without_column)
        return template_pairs(task, concept, self.neutral)

    def vector(self, request: AttackRequest, concept: str) -> torch.Tensor:
        engine = request.engine
        if self.vector_path:
            shape = tuple(engine.encode([""]).shape[1:])
            path = Path(self.vector_path.replace("{concept}", concept)).expanduser()
            return load_vector(path, shape)
        return concept_vector(engine.encode, self.pairs(request.task, concept)).cpu()

    # -- search --
    def attack(self, request: AttackRequest) -> list[AdversarialPrompt]:
        engine = request.engine
        tokenizer, text_encoder = engine.pipe.tokenizer, engine.pipe.text_encoder
        if self.length > tokenizer.model_max_length - 2:
            raise FiaBenchError(
                f"ring_a_bell: length={self.length} does not fit between BOS and EOS "
                f"(at most {tokenizer.model_max_length - 2})"
            )
        rows = request.prompts.head(self.limit) if self.limit else request.prompts
        fitness = Fitness(tokenizer, text_encoder, engine.device)
        if id(tokenizer) not in self._allowed:  # words: one tokenizer pass over the vocabulary
            self._allowed[id(tokenizer)] = candidate_tokens(
                tokenizer, text_encoder, self.vocabulary
            )
        allowed = self._allowed[id(tokenizer)]
        encoder_id = hash_tensors(sorted(text_encoder.state_dict().items()))
        vectors: dict[str, torch.Tensor] = {}
        self.results = []
        out = []
        for row in progress(rows.itertuples(), total=len(rows), desc="ring_a_bell", unit="prompt"):
            concept, source = str(row.concept), str(row.prompt)
            key = (encoder_id, request.seed, str(row.case_id), source, concept)
            if key not in self._memo:
                if concept not in vectors:
                    vectors[concept] = self.vector(request, concept)
                target = engine.encode([source])[0].float() + self.eta * vectors[concept].to(
                    engine.device
                )
                generator = torch.Generator("cpu").manual_seed(
                    derived_seed(request.seed, row.case_id)
                )
                search = genetic_search(
                    lambda tokens, target=target: fitness(tokens, target),
                    allowed,
                    length=self.length,
                    population=self.population,
                    generations=self.generations,
                    crossover=self.crossover,
                    mutation=self.mutation,
                    generator=generator,
                    desc=f"ring_a_bell {row.case_id}",
                )
                prompt = decode(tokenizer, search.tokens)
                as_seen = engine.encode([prompt]).float()
                self._memo[key] = Result(
                    str(row.case_id),
                    source,
                    prompt,
                    search.tokens,
                    search.fitness,
                    float((as_seen[0] - target).pow(2).sum()),
                    search.history,
                )
                log.info(
                    "ring_a_bell %s: fitness %.4g -> %.4g (re-tokenised prompt %.4g)",
                    row.case_id,
                    search.history[0],
                    search.fitness,
                    self._memo[key].prompt_fitness,
                )
            result = self._memo[key]
            self.results.append(result)
            out.append(
                AdversarialPrompt(
                    case_id=str(row.case_id),
                    source_prompt=source,
                    prompt=result.prompt,
                    seed=int(row.generation_seed),
                    concept=concept,
                )
            )
        return out
