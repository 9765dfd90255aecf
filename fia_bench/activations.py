"""Reading the inputs of a UNet's layers while it denoises. FIA and ConceptPrune choose neurons
from these activations; each batch's are handed to a reducer as they arrive, so that none is
kept, and the hooks are gone when the call returns (a hooked UNet would also turn off the
engine's compiled sampling)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fia_bench.engine import Engine
from fia_bench.errors import FiaBenchError

# reduce(layer name, denoising step, prompts in the batch, input tensor of the [uncond, cond] rows)
Reducer = Callable[[str, int, int, torch.Tensor], None]


@torch.no_grad()
def read_layer_inputs(
    engine: Engine,
    prompts: list[str],
    seed: int,
    modules: dict[str, torch.nn.Module],
    reduce: Reducer,
    *,
    steps: int,
    stop_after: int,
    guidance_scale: float,
    batch_size: int | None = None,
) -> None:
    """Denoise ``prompts`` from ``seed``'s latent for the first ``stop_after`` of ``steps``
    steps and hand each input of ``modules`` to ``reduce``."""
    state = {"step": -1, "batch": 0}

    def count_step(_module: Any, _args: Any) -> None:
        state["step"] += 1

    def reader(name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            if state["step"] >= stop_after:
                raise FiaBenchError(
                    f"reading layer inputs: a hook fired at step {state['step']} past {stop_after}"
                )
            reduce(name, state["step"], state["batch"], args[0])

        return hook

    handles = [engine.pipe.unet.register_forward_pre_hook(count_step)]
    handles += [m.register_forward_pre_hook(reader(n)) for n, m in modules.items()]
    size = batch_size or engine.sampler.batch_size
    try:
        for start in range(0, len(prompts), size):
            batch = prompts[start : start + size]
            state.update(step=-1, batch=len(batch))
            engine.sample_latents(
                batch,
                [seed] * len(batch),
                steps=steps,
                guidance_scale=guidance_scale,
                stop_after=stop_after,
            )
            if state["step"] != stop_after - 1:
                raise FiaBenchError(
                    f"reading layer inputs: saw {state['step'] + 1} denoising steps, "
                    f"expected {stop_after}"
                )
    finally:
        for handle in handles:
            handle.remove()
