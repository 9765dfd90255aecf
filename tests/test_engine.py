"""Generation: an image depends on its prompt and seed only, never on its batch, and the engine's
options (batch size, out-of-memory fall-back, channels_last, compile, SDPA) never change it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST
from omegaconf import OmegaConf
from tiny import tiny_engine, tiny_pipe

import fia_bench
from fia_bench.engine import Engine, EngineOptions, Sampler
from fia_bench.errors import FiaBenchError
from fia_bench.models import word_tokenizer
from fia_bench.tasks import load_task, world_vocabulary


def test_image_does_not_depend_on_batch_size_or_position() -> None:
    engine = tiny_engine()
    batch = engine.generate(
        ["a photo of a tench", "a photo of a church", "an image of a tench"], [3, 7, 11]
    )
    alone = engine.generate(["a photo of a church"], [7])
    assert np.array_equal(np.asarray(batch[1]), np.asarray(alone[0]))
    reordered = engine.generate(["an image of a tench", "a photo of a tench"], [11, 3])
    assert np.array_equal(np.asarray(batch[0]), np.asarray(reordered[1]))


def test_seed_and_prompt_change_the_image() -> None:
    engine = tiny_engine()
    a, b, c = engine.generate(["a photo of a tench"] * 2 + ["a photo of a church"], [1, 2, 1])
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_world_tokenizer_spells_every_concept_word_as_one_token() -> None:
    tokenizer = word_tokenizer(world_vocabulary("tiny"))
    for task in ("objects", "styles", "explicit"):
        for concept in load_task(task, "tiny").concepts:
            for word in concept.split():
                ids = tokenizer(word).input_ids
                assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))


def test_last_word_piece_is_the_row_before_the_end_token() -> None:
    engine = tiny_engine()
    prompts = ["tench", "a photo of a church", ""]
    hidden, last = engine.rows_and_last(prompts)
    ids = engine.tokenize(prompts).input_ids
    end = engine.pipe.tokenizer.eos_token_id
    assert last == [int((row == end).nonzero()[0]) - 1 for row in ids]
    assert last == [1, 5, 0]  # the empty prompt's is its start token
    assert hidden.dtype == torch.float64
    assert torch.equal(hidden, engine.encode(prompts).double())


# ---- engine options: how it runs never changes what it makes -------------------------------------
PROMPTS = [f"a photo of a {c}" for c in load_task("objects", "tiny").concepts[:4]] * 2
SEEDS = list(range(20, 28))


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def options_engine(options: EngineOptions, batch_size: int = 8) -> Engine:
    sampler = Sampler("ddim", 2, 7.5, 0.0, batch_size)
    return Engine(tiny_pipe(), sampler, 16, "cpu", torch.float32, options)


def fail_above(engine: Engine, rows: int) -> list[int]:
    """Make the UNet raise CUDA's out-of-memory error on batches of more than ``rows`` images
    (2 x rows CFG rows); returns the list of batch sizes that failed."""
    unet = engine.pipe.unet
    forward = unet.forward
    failed: list[int] = []

    def limited(sample: torch.Tensor, *args, **kwargs):
        if sample.shape[0] > 2 * rows:
            failed.append(sample.shape[0] // 2)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(sample, *args, **kwargs)

    unet.forward = limited
    return failed


def rounding_apart(images: list[np.ndarray], reference: list[np.ndarray]) -> bool:
    """Each image at most one grey level from the reference's image at its place: a CPU's GEMM
    kernels may depend on the batch size (seen at one thread on an AMD EPYC), so a smaller batch
    can move a pixel by float rounding."""
    return all(
        np.abs(a.astype(int) - b.astype(int)).max() <= 1
        for a, b in zip(images, reference, strict=False)
    )


def test_out_of_memory_halves_the_batch_keeps_it_and_changes_images_by_rounding_at_most() -> None:
    reference = arrays(options_engine(EngineOptions(batch_size=8)).generate(PROMPTS, SEEDS))
    engine = options_engine(EngineOptions(batch_size=8))
    failed = fail_above(engine, 3)
    with pytest.warns(UserWarning) as caught:
        images = arrays(engine.generate(PROMPTS, SEEDS))
    assert [str(w.message).split(";")[0] for w in caught] == [
        "out of memory at 8 images per batch",
        "out of memory at 4 images per batch",
    ]
    assert failed == [8, 4] and engine.batch_size == 2
    assert len(images) == len(reference) and rounding_apart(images, reference)
    again = arrays(engine.generate(PROMPTS[:5], SEEDS[:5]))  # remembered: no new failure
    assert failed == [8, 4]
    assert len(again) == 5 and rounding_apart(again, reference)


def test_out_of_memory_at_one_image_is_raised() -> None:
    engine = options_engine(EngineOptions(batch_size=2))
    fail_above(engine, 0)
    with pytest.raises(torch.OutOfMemoryError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.generate(PROMPTS[:2], SEEDS[:2])


def test_channels_last_images_are_close() -> None:
    plain = np.stack(arrays(options_engine(EngineOptions()).generate(PROMPTS, SEEDS)))
    engine = options_engine(EngineOptions(channels_last=True))
    conv = engine.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.shape[2] > 1
    fast = np.stack(arrays(engine.generate(PROMPTS, SEEDS)))
    assert np.abs(plain.astype(int) - fast.astype(int)).max() <= 2


def test_attention_is_sdpa_and_a_method_processor_is_kept() -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = tiny_pipe()
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    custom = AttnProcessor()
    custom.__class__ = type("MethodProcessor", (AttnProcessor,), {})
    name = next(iter(pipe.unet.attn_processors))
    pipe.unet.set_attn_processor(
        {n: custom if n == name else p for n, p in pipe.unet.attn_processors.items()}
    )
    Engine(pipe, Sampler("ddim", 2, 7.5, 0.0, 4), 16, "cpu", torch.float32)
    kinds = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    assert kinds.pop(name) is type(custom)
    assert set(kinds.values()) == {AttnProcessor2_0}
    assert {type(p) for p in pipe.vae.attn_processors.values()} == {AttnProcessor2_0}


def test_compiled_unet_samples_unless_the_module_is_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_compile(module: torch.nn.Module):
        def compiled(sample: torch.Tensor, *args, **kwargs):
            calls.append(sample.shape[0])
            return module(sample, *args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    reference = arrays(options_engine(EngineOptions()).generate(PROMPTS, SEEDS))
    engine = options_engine(EngineOptions(compile=True))
    images = arrays(engine.generate(PROMPTS, SEEDS))
    assert calls == [16, 16]  # both DDIM steps of the one CFG batch of 8
    assert all(np.array_equal(a, b) for a, b in zip(images, reference, strict=True))
    handle = engine.pipe.unet.mid_block.register_forward_pre_hook(lambda *_: None)
    engine.generate(PROMPTS[:1], SEEDS[:1])
    handle.remove()
    assert calls == [16, 16]


def test_auto_batch_size_fits_free_cuda_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert options_engine(EngineOptions(), batch_size=5).batch_size == 5  # CPU: the sampler's
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    for per_image, expected in [(gib, 8), (3 * gib, 2), (20 * gib, 1), (gib // 100, 32)]:
        engine = Engine(tiny_pipe(), Sampler("ddim", 2, 7.5, 0.0, 4), 16, "cuda", torch.float32)
        monkeypatch.setattr(engine, "image_bytes", lambda per_image=per_image: per_image)
        assert engine.batch_size == expected, per_image


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"batch_size": 0}, "engine.batch_size must be 'auto' or a positive integer"),
        ({"batch_size": "big"}, "engine.batch_size must be 'auto' or a positive integer"),
        ({"compile": "yes"}, "engine.compile must be true or false"),
    ],
)
def test_bad_engine_settings_are_one_line_errors(setting: dict, message: str) -> None:
    cfg = OmegaConf.create(
        {"batch_size": "auto", "channels_last": False, "compile": False} | setting
    )
    with pytest.raises(FiaBenchError, match=message):
        EngineOptions.from_config(cfg)


def test_engine_options_leave_image_keys_and_the_cache_alone(
    tmp_path: Path, cache_dir: Path
) -> None:
    """A run with every option changed finds all its images in the cache a plain run filled."""
    job = [*FAST, "method=uce", "seeds=1", "n_concepts=[1]"]
    plain = fia_bench.run(job, out_dir=str(tmp_path / "plain"))
    tuned = ["engine.batch_size=3", "engine.channels_last=true"]
    again = fia_bench.run([*job, *tuned], out_dir=str(tmp_path / "tuned"))
    assert plain.counts["images_generated"] > 0 and again.counts["images_generated"] == 0
    keys = sorted(plain.records["image_key"].unique())
    assert keys == sorted(again.records["image_key"].unique())
