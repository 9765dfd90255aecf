"""The SD v1 architecture built in code is SD v1.4's, module names and parameter counts alike."""

from __future__ import annotations

import pytest

from fia_bench.models import random_pipeline
from fia_bench.tasks import world_vocabulary


@pytest.fixture(scope="module")
def sd_v1():
    from accelerate import init_empty_weights

    with init_empty_weights():  # shapes only: no 4 GB of random numbers
        return random_pipeline("sd_v1", world_vocabulary("sd"), resolution=512, seed=0)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_are_sd_v14s(sd_v1) -> None:
    # performance.md: UNet 859,520,964; VAE 83,653,863; text encoder 123,060,480
    assert count(sd_v1.unet) == 859_520_964
    assert count(sd_v1.vae) == 83_653_863
    assert count(sd_v1.text_encoder) == 123_060_480


def test_module_layout_methods_rely_on(sd_v1) -> None:
    modules = dict(sd_v1.unet.named_modules())
    ffn2 = [m for n, m in modules.items() if n.endswith("ff.net.2")]
    kv = [n for n in modules if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(ffn2) == 16
    assert sum(m.in_features for m in ffn2) == 49_920
    assert sum(m.weight.numel() for m in ffn2) == 49_561_600
    assert len(kv) == 32
    assert all(modules[n].in_features == 768 for n in kv)
    assert sd_v1.unet.config.sample_size == 64


def test_offline_hub_model_fails_with_one_line_naming_the_fix(tmp_path, cache_dir) -> None:
    import fia_bench
    from fia_bench.errors import FiaBenchError

    with pytest.raises(
        FiaBenchError,
        match=r"cannot load model 'CompVis/stable-diffusion-v1-4'"
        r".*model\.source=/path",
    ) as err:
        fia_bench.run(["model=sd14", "seeds=1", "n_concepts=1"], out_dir=str(tmp_path / "run"))
    assert "\n" not in str(err.value)


def test_pretrained_loader_reads_a_local_diffusers_directory(tmp_path, cache_dir) -> None:
    """The SD code path (from_pretrained on a local directory) on a pipeline saved in the tiny
    world: it must give exactly the images of the in-memory pipeline it was saved from."""
    from tiny import tiny_pipe

    import fia_bench

    tiny_pipe().save_pretrained(tmp_path / "tiny_sd")
    common = [
        "sampler.steps=2",
        "task.prompts.settings.per_concept=2",
        "seeds=1",
        "n_concepts=1",
        "evaluator=[clip_score]",
    ]
    loaded = fia_bench.run(
        [
            *common,
            "model=sd14",
            f"model.source={tmp_path / 'tiny_sd'}",
            "model.world=tiny",
            "model.resolution=16",
            "model.judges.clip.arch=tiny_random",
            "+model.judges.clip.seed=0",
        ],
        out_dir=str(tmp_path / "a"),
    )
    built = fia_bench.run(common, out_dir=str(tmp_path / "b"))
    assert list(loaded.records["value"]) == pytest.approx(list(built.records["value"]), abs=1e-4)


def test_loading_a_pipeline_folder_prints_no_bars_and_no_dtype_warning(tmp_path, capfd) -> None:
    import warnings

    import torch
    from tiny import tiny_pipe

    from fia_bench.models import pretrained_pipeline

    tiny_pipe().save_pretrained(tmp_path / "pipe")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = pretrained_pipeline(str(tmp_path / "pipe"), None, torch.float16)
    out, err = capfd.readouterr()
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float16
    assert "Loading" not in out + err and "it/s" not in out + err, err
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
