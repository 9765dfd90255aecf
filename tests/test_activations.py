"""Reading layer inputs during denoising (FIA's and ConceptPrune's saliency): every hooked layer
is read once per step of every batch, on both guidance halves, and nothing stays hooked."""

from __future__ import annotations

import numpy as np
from tiny import tiny_engine

from fia_bench.activations import read_layer_inputs
from fia_bench.engine import has_hooks


def test_each_layer_is_read_at_each_step_of_each_batch_and_the_hooks_are_removed() -> None:
    engine = tiny_engine(steps=4, batch_size=2)
    unet = engine.pipe.unet
    layers = {n: m for n, m in unet.named_modules() if n.endswith("ff.net.2")}
    assert layers
    before = np.asarray(engine.generate(["a photo of a tench"], [5])[0])
    seen: list[tuple[str, int, int, int, int]] = []

    def reduce(name: str, step: int, batch: int, x) -> None:
        seen.append((name, step, batch, x.shape[0], x.shape[-1]))

    prompts = ["a photo of a tench", "a photo of a church", "an image of a tench"]
    read_layer_inputs(engine, prompts, 3, layers, reduce, steps=4, stop_after=3, guidance_scale=7.5)
    expected = sorted(
        (name, step, batch, 2 * batch, layer.in_features)
        for batch in (2, 1)  # three prompts in batches of the sampler's two
        for step in range(3)
        for name, layer in layers.items()
    )
    assert sorted(seen) == expected
    assert not has_hooks(unet)
    after = np.asarray(engine.generate(["a photo of a tench"], [5])[0])
    assert np.array_equal(before, after)
