"""Presets and experiments are applied after the primary config, so their values win, and the
command line still wins over both."""

from __future__ import annotations

import fia_bench


def test_preset_and_experiment_override_the_primary_config() -> None:
    smoke = fia_bench.compose(["preset=smoke"])
    assert (smoke.seeds, list(smoke.n_concepts), smoke.sampler.steps) == (1, [1], 4)
    sweep = fia_bench.compose(["experiment=tiny_sweep"])
    assert (sweep.seeds, list(sweep.n_concepts)) == (3, [1, 2, 5])
    assert fia_bench.compose(["preset=smoke", "seeds=5"]).seeds == 5
