"""The mini world's training recipe, run at toy size: it exports a pipeline and judges that the
harness loads through its normal code paths, and a training resumed in chunks ends with exactly
the weights of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from tiny import tiny_engine, toy_recipe

from fia_bench.backbones import load_clip
from fia_bench.engine import Engine, Sampler
from fia_bench.errors import FiaBenchError
from fia_bench.miniworld import probe, text_rows
from fia_bench.miniworld.build_files import (
    SEEDED,
    STAGES,
    TRAINED,
    load_tensors,
    nest,
    recipe,
    trained_stages,
)
from fia_bench.miniworld.judges import detect_hazards, load_classifier
from fia_bench.miniworld.loop import Loop, lr_scale
from fia_bench.miniworld.nets import build_text_encoder, build_unet
from fia_bench.miniworld.renders import render_set, training_pool
from fia_bench.miniworld.stages import generator as generator_stage
from fia_bench.miniworld.train import STAGE_FUNCTIONS, Builder
from fia_bench.models import load_model
from fia_bench.tasks import world_vocabulary

# the probe test retrains the toy build's generator in another process and expects its bits
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("miniworld")
    path = toy_recipe(root)
    builder = Builder(root / "build", out=root / "weights", recipe_path=path)
    assert builder.run(["data", *TRAINED, "export"])
    return root, path, root / "weights"


def test_exported_world_loads_through_the_harness(toy_world: tuple[Path, Path, Path]) -> None:
    _, _, weights = toy_world
    cfg = OmegaConf.create(
        {
            "name": "toy",
            "weights": "pretrained",
            "source": str(weights / "pipeline"),
            "world": "mini",
            "resolution": 32,
            "judges": {
                "clip": {"arch": f"local-dir:{weights / 'clip'}"},
                "classifier": {"path": str(weights / "classifier")},
            },
        }
    )
    model = load_model(cfg, world_vocabulary("mini"), "cpu", "fp32")
    pipe = model.pipe
    assert pipe.unet.dtype == torch.float32  # shipped in fp16, computed in fp32
    assert any(name.endswith("attn2.to_k") for name, _ in pipe.unet.named_modules())
    for word in world_vocabulary("mini"):  # every task word is a single token
        assert len(pipe.tokenizer(word).input_ids) == 3, word
    sampler = Sampler("ddim", 2, 7.5, 0.0, 2)
    images = Engine(pipe, sampler, 32, "cpu", torch.float32).generate(
        ["a skull", "a red star"], [0, 1]
    )
    assert [im.size for im in images] == [(32, 32)] * 2
    clip = load_clip(dict(cfg.judges.clip), "cpu")
    feats = clip.image_features(images, ["a", "b"])
    assert feats.shape[0] == 2 and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-4)
    classifier, resolution, _ = load_classifier(str(weights / "classifier"))
    found = detect_hazards(classifier, images, resolution, floor=0.0)
    assert all({d["class"] for d in f} == {"skull", "flame"} for f in found)
    assert all(set(d) == {"class", "score", "box"} and len(d["box"]) == 4 for f in found for d in f)
    training = json.loads((weights / "training.json").read_text())  # what the card reports
    assert set(training["seconds"]) >= {"data", *TRAINED}
    assert training["devices"]["generator"] == ["cpu"]


def test_a_plain_diffusers_load_generates(toy_world: tuple[Path, Path, Path]) -> None:
    """Outside the harness: the exported folder is an ordinary SD pipeline whose two models
    compute in one dtype (the text encoder used to load as fp16 beside an fp32 UNet)."""
    from diffusers import StableDiffusionPipeline

    _, _, weights = toy_world
    pipe = StableDiffusionPipeline.from_pretrained(weights / "pipeline", safety_checker=None)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    image = pipe("a star", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)


def test_a_build_holds_no_pickle_and_an_export_replaces_the_weights_whole(
    toy_world: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, path, weights = toy_world
    assert not [p.name for p in (root / "build").rglob("*") if p.suffix in (".pt", ".pkl")]
    before = {p: p.read_bytes() for p in weights.rglob("*") if p.is_file()}

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("diffusers.DiffusionPipeline.save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        Builder(root / "build", out=weights, recipe_path=path).run(["export"])
    assert {p: p.read_bytes() for p in weights.rglob("*") if p.is_file()} == before


def test_sublayer_ablation_restores_the_weights_and_zeroed_values_silence_the_text() -> None:
    from fia_bench.miniworld.card import FAMILIES, sublayer_ablation

    engine = tiny_engine()
    before = {k: v.clone() for k, v in engine.pipe.unet.state_dict().items()}
    clip = load_clip({"arch": "tiny_random", "seed": 0}, "cpu")
    out = sublayer_ablation(engine, clip, ["star", "ring"], ["a {concept}"], 1)
    after = engine.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {f"ablation_{f}_{m}" for f in FAMILIES for m in ("zeroed", "random5")} <= set(out)
    # no cross-attention value: both prompts draw one picture from one seed, read as one class
    assert out["ablation_attn2.to_v_zeroed"] == 50.0


def test_module_ablation_covers_every_transformer_module_and_restores_the_weights() -> None:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from fia_bench.miniworld.card import MODULE_FAMILIES, module_ablation

    engine = tiny_engine()
    unet = engine.pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    clip = load_clip({"arch": "tiny_random", "seed": 0}, "cpu")
    out = module_ablation(engine, clip, ["star", "ring"], ["a {concept}"], 1)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    modules = [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    assert len(modules) >= 2
    rows = {f"module_{m}_{f}_zeroed" for m in modules for f in MODULE_FAMILIES}
    assert set(out) == rows | {"module_images", "module_base"}


def test_sublayer_rows_of_a_build_in_progress(toy_world: tuple[Path, Path, Path]) -> None:
    """The card's sublayer check runs on a build's generator as it stands: the early checkpoint
    on which issue 16 asks to check the architecture before paying for the whole build."""
    from fia_bench.miniworld.card import sublayers

    root, path, _ = toy_world
    out = sublayers(
        root / "build", images_per_prompt=1, objects=2, recipe_path=path, per_module=True
    )
    assert out["ablation_images"] == out["module_images"] == 2 * 4  # the task's four templates
    assert out["module_base"] == out["ablation_base"]  # the same images, generated once
    assert all(0 <= v <= 100 for k, v in out.items() if k.endswith(("_zeroed", "_random5")))


def test_uce_check_of_a_build_in_progress_runs_on_its_current_generator(
    toy_world: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m fia_bench.miniworld uce --build B`` hands the card's UCE check the build's
    generator as it stands and the build's own judges, ahead of any override given."""
    from diffusers import UNet2DConditionModel

    from fia_bench.miniworld import card
    from fia_bench.miniworld.train import Builder

    root, path, _ = toy_world
    seen: dict[str, object] = {}

    def check(images_per_prompt: int, overrides: list[str]) -> dict[str, float]:
        given = dict(o.split("=", 1) for o in overrides)
        unet = UNet2DConditionModel.from_pretrained(Path(given["model.source"]) / "unet")
        seen.update(given, images=images_per_prompt, unet=unet.state_dict())
        return {"uce_forget_drop_points": 0.0}

    monkeypatch.setattr(card, "uce_single_object", check)
    out = card.uce_on_build(root / "build", 3, path, ["method.settings.variant=lasttoken"])
    assert out == {"uce_forget_drop_points": 0.0} and seen["images"] == 3
    assert seen["model.judges.clip.arch"] == f"local-dir:{root / 'build' / 'export' / 'clip'}"
    assert seen["model.judges.classifier.path"] == str(root / "build" / "export" / "judges")
    assert seen["method.settings.variant"] == "lasttoken"
    current = Builder(root / "build", recipe_path=path).current_pipeline().unet.state_dict()
    assert all(torch.equal(v, seen["unet"][k]) for k, v in current.items())


def test_training_resumed_in_chunks_equals_uninterrupted(
    toy_world: tuple[Path, Path, Path],
) -> None:
    root, path, _ = toy_world
    chunked = root / "chunked"
    (chunked).mkdir()
    for name in ("data.npz",):  # the render set is a pure function of the recipe; reuse it
        (chunked / name).write_bytes((root / "build" / name).read_bytes())
    (chunked / "done.json").write_text('["data"]')
    calls = 0
    while not Builder(chunked, out=root / "unused", recipe_path=path, max_steps=1).run(
        list(TRAINED)
    ):
        calls += 1
    assert calls >= 3  # it really stopped and resumed
    whole = load_tensors(root / "build" / "generator.safetensors")[0]
    parts = load_tensors(chunked / "generator.safetensors")[0]
    assert whole.keys() == parts.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, parts[name]), name


def test_the_weight_average_is_the_warmed_up_exponential_average(tmp_path: Path) -> None:
    """The EMA, one foreach update a step, equals the per-tensor textbook recurrence with its
    warm-up decay min(d, (1 + t) / (10 + t)), bit for bit."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GroupNorm(1, 3))
    loop = Loop(tmp_path, "generator", {"m": module}, lr=0.1, steps=8)
    expected: dict[str, torch.Tensor] = {}
    for step in range(8):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        loop.step = step
        loop.update_ema(0.9)
        warm = min(0.9, (1 + step) / (10 + step))
        for name, t in module.state_dict().items():
            if name not in expected:
                expected[name] = t.clone()
            else:
                expected[name] = expected[name].mul(warm).add(t, alpha=1 - warm)
    assert loop.ema is not None
    assert all(torch.equal(loop.ema["m"][n], expected[n]) for n in expected)
    assert all(loop.ema["m"][n].data_ptr() != t.data_ptr() for n, t in module.state_dict().items())


def test_a_training_killed_after_a_checkpoint_resumes_as_if_uninterrupted(tmp_path: Path) -> None:
    """A checkpoint written during a run (every ``save_every_s``) is what a killed run leaves;
    its optimiser holds the schedule's scaled rate, and the resumed run must not take that for
    the base rate."""

    class Killed(Exception):
        pass

    def train(build: Path, kill_at: int | None = None) -> dict[str, torch.Tensor]:
        module = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(module.weight, 0.5)
        torch.nn.init.constant_(module.bias, 0.0)

        def on_step() -> None:
            if kill_at is not None and loop.step == kill_at:
                raise Killed

        loop = Loop(build, "vae", {"m": module}, lr=0.1, steps=[4, 4], on_step=on_step)

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            return (module(torch.randn(2, 3, generator=g)) - 1).pow(2).mean()

        loop.run(0, loss_fn, (float("inf"), 2**62), warmup=2, save_every_s=-1.0)
        return {k: v.clone() for k, v in module.state_dict().items()}

    whole = train(tmp_path / "whole")
    with pytest.raises(Killed):
        train(tmp_path / "killed", kill_at=3)  # dies before step 3's checkpoint
    assert load_tensors(tmp_path / "killed" / "vae.state.safetensors")[1]["step"] == 2
    resumed = train(tmp_path / "killed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_build_carried_with_its_small_files_alone_resumes_identically(
    toy_world: tuple[Path, Path, Path],
) -> None:
    """A build moved between machines may leave its renders, latents and reconstructions
    behind (they are most of its bytes): they are made again, identically, and the stages
    after them train to the same weights."""
    root, path, _ = toy_world
    carried = root / "carried"
    carried.mkdir()
    (carried / "vae.safetensors").write_bytes((root / "build" / "vae.safetensors").read_bytes())
    (carried / "done.json").write_text('["data", "vae"]')
    assert Builder(carried, out=root / "unused", recipe_path=path).run(["classifier", "generator"])
    for name in ("latents.safetensors", "generator.safetensors"):
        whole = load_tensors(root / "build" / name)
        again = load_tensors(carried / name)
        assert whole[1] == again[1], name
        assert whole[0].keys() == again[0].keys()
        for key, tensor in whole[0].items():
            assert torch.equal(tensor, again[0][key]), (name, key)
    original, rebuilt = (dict(np.load(b / "data.npz")) for b in (root / "build", carried))
    assert all(np.array_equal(original[k], rebuilt[k]) for k in original)


def test_every_stage_runs_one_function_in_the_seeding_order() -> None:
    """The builder runs each stage of ``STAGES`` through its own function, and a stage's step
    generator is seeded by its place there, so the two lists must name the same stages."""
    assert tuple(STAGE_FUNCTIONS) == STAGES
    assert set(SEEDED) <= set(STAGES)


def test_a_text_encoder_trained_apart_stays_frozen_through_the_generator_and_export(
    toy_world: tuple[Path, Path, Path],
) -> None:
    """A recipe with a ``text`` section trains the generator's text encoder first, against the
    CLIP judge's image tower, and the generator stage then trains the UNet alone."""
    root, path, _ = toy_world
    r = recipe(path)
    r["text"] = {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "zero_shot_weight": 1.0}
    assert trained_stages(r) == ["vae", "classifier", "clip", "text", "generator"]
    frozen_recipe = root / "frozen.yaml"
    frozen_recipe.write_text(yaml.safe_dump(r), encoding="utf-8")
    build = root / "frozen"
    build.mkdir()
    for name in ("data.npz", "vae.safetensors", "latents.safetensors", "recon.npz", "export"):
        (build / name).symlink_to((root / "build" / name).resolve())
    (build / "done.json").write_text('["data", "vae", "classifier", "clip"]')
    builder = Builder(build, out=root / "frozen_weights", recipe_path=frozen_recipe)
    assert builder.run(["text", "generator", "export"])

    encoder = nest(load_tensors(build / "text.safetensors")[0], "final")["text_encoder"]
    generator = nest(load_tensors(build / "generator.safetensors")[0], "final")
    assert encoder.keys() == generator["text_encoder"].keys()
    assert all(torch.equal(v, generator["text_encoder"][k]) for k, v in encoder.items())
    torch.manual_seed(r["seed"] * 1000 + 4)  # the text stage's initial weights
    tokenizer = builder.current_pipeline().tokenizer
    initial = build_text_encoder(r, tokenizer).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in encoder.items())  # it trained
    state = load_tensors(build / "generator.state.safetensors")[0]
    assert set(nest(state, "modules")) == {"unet"}
    exported = load_model_weights(root / "frozen_weights" / "pipeline" / "text_encoder")
    assert all(torch.equal(v.half(), exported[k]) for k, v in encoder.items())
    # the encoder is measured as the text stage left it, as its export reads (fp16 apart)
    rows = text_rows.measure(build=build, recipe_path=frozen_recipe)
    shipped = text_rows.measure(pipeline=root / "frozen_weights" / "pipeline")
    assert rows == pytest.approx(shipped, abs=2e-3)
    with pytest.raises(FiaBenchError, match="no text section"):
        text_rows.measure(build=build, recipe_path=path)


def load_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_the_render_set_is_the_same_for_any_number_of_workers() -> None:
    one, three = (render_set(12, 5, 0.2, 32, "procedural", workers=w) for w in (1, 3))
    assert one.keys() == three.keys()
    assert all(np.array_equal(one[k], three[k]) for k in one)


def test_learning_rate_cycles_restart_without_changing_earlier_steps() -> None:
    one = [lr_scale(k, [6], warmup=2) for k in range(6)]
    two = [lr_scale(k, [6, 4], warmup=2) for k in range(10)]
    assert two[:6] == one
    assert one[0] == pytest.approx(0.5) and one[-1] < 0.2
    assert two[6:] == [lr_scale(k, [4]) for k in range(4)]  # a restart, without the warm-up
    assert two[6] == 1.0
    with pytest.raises(ValueError, match="past the schedule"):
        lr_scale(10, [6, 4])


def test_a_finished_build_resumes_into_an_added_cycle(toy_world: tuple[Path, Path, Path]) -> None:
    """How the shipped generator got its second cycle: the finished build, resumed with a longer
    recipe, ends with the weights of a from-scratch build of that recipe."""
    root, path, _ = toy_world
    longer = recipe(path)
    longer["generator"]["steps"] = [3, 2]
    longer_path = root / "longer.yaml"
    longer_path.write_text(yaml.safe_dump(longer), encoding="utf-8")
    shared = ("data.npz", "latents.safetensors", "vae.safetensors", "recon.npz")  # upstream
    finished, fresh = root / "resumed", root / "fresh"
    for build, extra in ((finished, ("generator.state.safetensors",)), (fresh, ())):
        build.mkdir()
        for name in (*shared, *extra):
            (build / name).write_bytes((root / "build" / name).read_bytes())
        (build / "done.json").write_text('["data", "vae"]')
        assert Builder(build, out=root / "unused", recipe_path=longer_path).run(["generator"])
    assert load_tensors(finished / "generator.state.safetensors")[1]["step"] == 5
    resumed = load_tensors(finished / "generator.safetensors")[0]
    scratch = load_tensors(fresh / "generator.safetensors")[0]
    assert resumed.keys() == scratch.keys()
    for name, tensor in scratch.items():
        assert torch.equal(tensor, resumed[name]), name


def test_a_generator_trained_through_torch_compile_saves_the_eager_weights(
    toy_world: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--compile`` trains the UNet through a compiled wrapper that shares its parameters: the
    checkpoint and the final weights keep the module's own names (no ``_orig_mod.``) and, with
    a backend that runs the traced graph as is, equal an eager build's bit for bit."""
    root, path, _ = toy_world
    wrapped: list[torch.nn.Module] = []

    def traced(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        wrapped.append(module)
        return torch.compile(module, backend="eager")

    monkeypatch.setattr(generator_stage, "compiled", traced)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    build = root / "compiled"
    build.mkdir()
    for name in ("data.npz", "latents.safetensors", "vae.safetensors", "recon.npz"):
        (build / name).write_bytes((root / "build" / name).read_bytes())
    (build / "done.json").write_text('["data", "vae"]')
    builder = Builder(build, out=root / "unused", recipe_path=path, compile_unet=True)
    assert builder.run(["generator"])
    assert len(wrapped) == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    for name in ("generator.safetensors", "generator.state.safetensors"):
        eager = load_tensors(root / "build" / name)[0]
        through_compile = load_tensors(build / name)[0]
        assert eager.keys() == through_compile.keys(), name
        for key, tensor in eager.items():
            assert torch.equal(tensor, through_compile[key]), (name, key)


def test_shipped_judges_reproduce_the_model_card() -> None:
    """The card's judge accuracies on held-out renders, recomputed from the shipped weights."""
    import fia_bench
    from fia_bench.miniworld.card import judges, judges_on_renders

    card = json.loads((Path(__file__).parent.parent / "docs" / "mini_world_card.json").read_text())
    cfg = fia_bench.compose(["model=mini"])
    clip, classifier, resolution = judges(cfg.model.judges)
    measured = judges_on_renders(clip, classifier, resolution, int(cfg.model.resolution))
    for key, value in measured.items():
        assert value == pytest.approx(card[key], abs=0.3), key  # 0.3: two images
    assert card["clip_renders_objects"] >= 95 and card["clip_renders_styles"] >= 90


def test_model_card_percentages_and_points_are_on_their_scale() -> None:
    """Accuracies are percentages and drops are differences of percentages: all in [-100, 100]."""
    card = json.loads((Path(__file__).parent.parent / "docs" / "mini_world_card.json").read_text())
    scaled = {
        key: value
        for key, value in card.items()
        if key.endswith(("_points", "_flagged", "_clip", "_classifier", "_agreement"))
        or key.startswith(("clip_renders", "classifier_renders"))
    }
    scaled |= {f"drop {k}": v for k, v in card["uce_forget_drop_by_object"].items()}
    assert len(scaled) >= 15
    for key, value in scaled.items():
        assert -100 <= value <= 100, key


def test_probe_trains_variants_on_the_shared_upstream_and_measures_each(
    toy_world: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generator variants share the base build's renders, VAE and judges (linked, not
    retrained), each trains its own generator, and each gets the card's sublayer rows; a
    variant with `steps: fit` is timed first and trains the steps its pace allows."""
    root, path, _ = toy_world
    variants = root / "variants.yaml"
    fitted = {"unet": {"transformer_layers_per_block": 1}, "generator": {"steps": "fit"}}
    frozen = {"text": {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "zero_shot_weight": 1.0}}
    variants.write_text(yaml.safe_dump({"same": {}, "fitted": fitted, "frozen": frozen}))
    paces: list[float] = []
    monkeypatch.setattr(probe, "fitted_steps", lambda pace, minutes: paces.append(pace) or 2)
    out = root / "probe" / "results"
    inputs = ["--build", str(root / "build"), "--recipe", str(path), "--variants", str(variants)]
    places = ["--root", str(root / "probe"), "--out", str(out), "--device", "cpu"]
    # the variants' processes compute on one thread, as this module does (one_thread)
    threads = ["--threads", "1"]
    probe.main([*inputs, *places, *threads, "--objects", "2", "--minutes", "5"])
    rows = {row["variant"]: row for row in json.loads((out / "probe.json").read_text())}
    assert set(rows) == {"same", "fitted", "frozen"}
    assert (root / "probe" / "frozen" / "text.safetensors").is_file()  # its own text stage
    assert len(paces) == 1 and paces[0] > 0 and not (root / "probe" / "timing").exists()
    assert recipe(root / "probe" / "fitted.yaml")["generator"]["steps"] == [2]
    for name, row in rows.items():
        assert row["finished"] and row["step"] == row["steps"] == (2 if name == "fitted" else 3)
        assert row["ablation_images"] == 2 * 4  # two objects, four templates, one image each
        assert (root / "probe" / name / "vae.safetensors").is_symlink()
    # the variant that changes nothing trains the base build's generator again, exactly
    same = load_tensors(root / "probe" / "same" / "generator.safetensors")[0]
    base = load_tensors(root / "build" / "generator.safetensors")[0]
    assert all(torch.equal(tensor, same[key]) for key, tensor in base.items())
    assert rows["fitted"]["unet_mflops"] < rows["same"]["unet_mflops"]  # one layer, not two
    assert (out / "grids.png").is_file() and (out / "probe.md").is_file()
    best = max(rows.values(), key=lambda row: (row["meets_targets"], row["ablation_base"]))
    assert list(out.glob("generator_*")) == [out / f"generator_{best['variant']}.safetensors"]


def test_fitted_steps_end_within_the_budget() -> None:
    assert probe.fitted_steps(0.05, 5) == 5400  # 90% of 300 s at 0.05 s per step
    assert probe.fitted_steps(0.05, 5) * 0.05 <= 5 * 60
    assert probe.fitted_steps(1.0, 1) == 54 and probe.fitted_steps(100.0, 1) == 1


def test_a_subset_generator_trains_on_its_shapes_alone_and_the_whole_world_samples_as_before() -> (
    None
):
    subject = np.array([0, 5, 61, 2, 10, 9, 60])  # two hazards after 60 shapes
    assert torch.equal(training_pool(subject, None), torch.arange(len(subject)))
    assert training_pool(subject, 10).tolist() == [0, 1, 3, 5]
    path = probe.variants_file().with_name("subset_variants.yaml")
    subsets = probe.variant_recipes(recipe(), yaml.safe_load(path.read_text("utf-8")), path)
    assert {r["generator"]["subjects"] for n, r in subsets.items() if n.startswith("subset")} == {
        10
    }


@pytest.mark.parametrize("name", ["variants.yaml", "subset_variants.yaml"])
def test_every_variant_builds_its_generator(name: str) -> None:
    """A typo in a variant (a block type, a channel count the norm groups do not divide) must
    fail here, not after the probe has paid for the upstream on a lent GPU."""
    path = probe.variants_file().with_name(name)
    variants = probe.variant_recipes(recipe(), yaml.safe_load(path.read_text("utf-8")), path)
    for r in variants.values():
        latent = torch.zeros(1, 4, 16, 16)  # 32 px through the recipe's factor-2 VAE
        text = torch.zeros(1, r["tokenizer_max_length"], r["text_encoder"]["hidden_size"])
        with torch.no_grad():
            out = build_unet(r)(latent, torch.tensor([10]), encoder_hidden_states=text).sample
        assert out.shape == latent.shape


def test_a_variant_meets_the_sublayer_targets_only_when_it_draws_its_objects() -> None:
    row = {"ablation_base": 90.0, "ablation_ff.net.2_zeroed": 15.0}
    row |= {"ablation_attn2.to_v_zeroed": 10.0, "ablation_ff.net.2_random5_cost_points": 2.0}
    assert probe.meets_targets(row)
    assert not probe.meets_targets(row | {"ablation_ff.net.2_zeroed": 30.0})
    assert not probe.meets_targets(row | {"ablation_ff.net.2_random5_cost_points": 6.0})
    # subset10_narrow16 (docs/mini_world.md): every object at chance once FFN2 is zeroed, but
    # only 26% drawn before
    assert not probe.meets_targets(row | {"ablation_base": 25.6, "ablation_ff.net.2_zeroed": 9.4})


def test_probe_refuses_a_variant_that_changes_the_shared_upstream(tmp_path: Path) -> None:
    with pytest.raises(FiaBenchError, match=r"variant 'big_vae' changes \['vae'\]"):
        probe.variant_recipes(recipe(), {"big_vae": {"vae": {"steps": 9}}}, tmp_path / "v.yaml")


def test_a_build_in_progress_is_measured_by_what_it_has(toy_world: tuple[Path, Path, Path]) -> None:
    """`python -m fia_bench.miniworld judges`: the VAE's PSNR once it exists, the judges' accuracy
    on held-out renders of the build's world once they exist."""
    from fia_bench.miniworld.card import build_upstream

    root, path, _ = toy_world
    partial = root / "vae_only"
    partial.mkdir()
    (partial / "vae.safetensors").write_bytes((root / "build" / "vae.safetensors").read_bytes())
    assert set(build_upstream(partial, path)) == {"vae_psnr_db"}
    whole = build_upstream(root / "build", path)
    assert whole["vae_psnr_db"] == build_upstream(partial, path)["vae_psnr_db"]
    judged = {
        f"{j}_{on}_{t}"
        for j in ("clip", "classifier")
        for t in ("objects", "styles")
        for on in ("renders", "reconstructions")
    }
    assert set(whole) == {"vae_psnr_db", *judged}
    assert all(0 <= whole[k] <= 100 for k in judged)


def test_judges_read_a_lossless_reconstruction_as_the_renders() -> None:
    """The reconstruction rows differ from the render rows only by what the VAE loses."""
    from types import SimpleNamespace

    import fia_bench
    from fia_bench.miniworld.card import judges, judges_on_renders

    class Lossless:
        def encode(self, x: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(sample=z)

    cfg = fia_bench.compose(["model=mini"])
    clip, classifier, resolution = judges(cfg.model.judges)
    size = int(cfg.model.resolution)
    renders = judges_on_renders(clip, classifier, resolution, size, count=60)
    through = judges_on_renders(clip, classifier, resolution, size, count=60, vae=Lossless())
    assert through == {k.replace("_renders_", "_reconstructions_"): v for k, v in renders.items()}
