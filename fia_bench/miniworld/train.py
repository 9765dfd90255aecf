"""Train the mini world from scratch: data → VAE → judges → (text encoder) → UNet → export.

Every stage keeps its state in the build directory and resumes from it, so training runs in
chunks (``--max-minutes``); batches and noise of step k come from a CPU generator seeded by
(recipe seed, stage, k), so a resumed run draws exactly what an uninterrupted one would, on a GPU
as on the CPU (the draws are the same on both; the float arithmetic is not). The
exported world is a diffusers ``StableDiffusionPipeline`` directory plus the two judges, stored
in fp16 to keep the repository small."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fia_bench.miniworld.build_files import SEEDED
from fia_bench.miniworld.stages.captions import train_clip, train_text
from fia_bench.miniworld.stages.generator import export, train_generator
from fia_bench.miniworld.stages.images import train_classifier, train_vae
from fia_bench.miniworld.state import BuildState


def render_data(state: BuildState) -> bool:
    state.render_data()
    return True


STAGE_FUNCTIONS: dict[str, Callable[[BuildState], bool]] = {
    "data": render_data,
    "vae": train_vae,
    "classifier": train_classifier,
    "clip": train_clip,
    "text": train_text,
    "generator": train_generator,
    "export": export,
}


class Builder(BuildState):
    """Runs the stages in order."""

    def run(self, stages: list[str]) -> bool:
        """Stages marked done (the ledger) are skipped, export excepted."""
        for stage in stages:
            if stage in self.ledger.done() and stage != "export":
                continue
            self.ledger.start(stage)
            if stage in SEEDED:  # initial weights must not depend on which stages ran before
                torch.manual_seed(self.seed * 1000 + SEEDED.index(stage))
            finished = STAGE_FUNCTIONS[stage](self)
            self.ledger.finish(stage, self.device.type, finished)
            if not finished:
                print(
                    f"[mini-world] {stage}: paused at the time or step limit; run again to resume"
                )
                return False
        return True
