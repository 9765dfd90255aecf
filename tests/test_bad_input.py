"""Every bad input ends in one line naming the key, the value and what is valid, before any model
loads: the command line's overrides (checked in-process through the same entry points the CLI
calls, with the model loader replaced by a tripwire) and ``fia_bench.report``'s inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import open_dict

import fia_bench
from fia_bench import runner
from fia_bench.cli import check_overrides
from fia_bench.errors import FiaBenchError
from fia_bench.records import RECORD_COLUMNS, RUN_COLUMNS, declared
from fia_bench.report import main as report_main
from fia_bench.tasks import load_task

M = ["method=uce"]
FIA, SCAPRE, ESD, MASK = ["method=fia"], ["method=scapre"], ["method=esd"], ["method=dynamic_mask"]
DETECTOR = ["evaluator=[detector]"]
CSV_TASK = [
    "task.prompts.dataset=prompt_csv",
    "~task.prompts.settings.per_concept",
    "~task.prompts.settings.seed_base",
]

# (overrides, a piece of the one-line message); {tmp} is the test's temporary folder
CLI_CASES = [
    # types: nothing is truncated or coerced
    (["seeds=[1.5]"], "seeds=[1.5]: must be"),
    (["seeds=[abc]"], "seeds=['abc']: must be"),
    (["seeds=abc"], "seeds='abc': must be"),
    (["seeds=1.5"], "seeds=1.5: must be"),
    (["seeds=true"], "seeds=true: must be"),
    (["seeds=0"], "seeds=0: must be an integer >= 1"),
    (["seeds=-2"], "seeds=-2: must be"),
    (["seeds=[]"], "seeds=[]: must be"),
    (["seeds=[-1]"], "seeds=[-1]: must be"),
    (["seeds=[4294967296]"], "seeds=[4294967296]: must be"),
    (["seeds=[1,1]"], "a seed is listed twice"),
    (["n_concepts=1.5"], "n_concepts=1.5: must be"),
    (["n_concepts=[1.7]"], "n_concepts=[1.7]: must be"),
    (["n_concepts=[]"], "n_concepts=[]: must be"),
    (["n_concepts=0"], "n_concepts=0: must be"),
    (["n_concepts=abc"], "n_concepts='abc': must be"),
    (["n_concepts=[1,abc]"], "n_concepts=[1, 'abc']: must be"),
    (["n_concepts=11"], "has 10 concepts; use 1..10"),
    (["concepts=[]"], "concepts=[]: must be null or a non-empty list"),
    (["concepts=5"], "concepts=5: must be"),
    (["concepts=[zebra]"], "unknown concept for task 'objects'"),
    (["concepts=[tench,tench]"], "a concept is listed twice"),
    (["retain=[]"], "retain=[]: must be null or a non-empty list"),
    (["retain=[zebra]"], "unknown concept for task 'objects'"),
    (["retain=[church,church]"], "retain=['church', 'church']: a concept is listed twice"),
    (["concepts=[tench]", "retain=[tench,church]"], "['tench'] also in concepts="),
    (["reference=nonne"], "did you mean 'none'"),
    (["seed_policy=sometimes"], "valid choices: erase, erase_and_generate"),
    (["precision=fp8"], "unknown precision 'fp8'"),
    (["logger.name=slack"], "unknown logger.name 'slack'"),
    (["seeds=${oc.env:FIA_BENCH_NO_SUCH_VARIABLE}"], "FIA_BENCH_NO_SUCH_VARIABLE"),
    (["model.resolution=abc"], "model.resolution='abc': must be an integer >= 8"),
    (["model.weights=maybe"], "unknown model.weights 'maybe'"),
    (["+evaluator.clip_accuracy.roles=[target]"], "unknown evaluator.clip_accuracy.roles[0]"),
    # devices and folders
    (["device=gpu"], "device='gpu': valid devices are cpu, cuda and cuda:N"),
    (["device=cuda:x"], "valid devices are cpu, cuda and cuda:N"),
    (["device=cuda:99"], "device=cuda:99"),
    (["out_dir={tmp}/a_file"], "is not writable"),
    (["cache_dir={tmp}/a_file/cache"], "cache_dir="),
    (["out_dir=/proc/fia_bench_out"], "out_dir=/proc/fia_bench_out is not writable"),
    # sampler, engine, report
    (["sampler.steps=0"], "sampler.steps=0: must be an integer >= 1"),
    (["sampler.steps=-3"], "sampler.steps=-3: must be"),
    (["sampler.steps=2.5"], "sampler.steps=2.5: must be"),
    (["sampler.batch_size=0"], "sampler.batch_size=0: must be"),
    (["sampler.guidance_scale=nan"], "sampler.guidance_scale=nan: must be a finite number"),
    (["sampler.guidance_scale=inf"], "sampler.guidance_scale=inf"),
    (["sampler.guidance_scale=abc"], "sampler.guidance_scale='abc'"),
    (["sampler.eta=2"], "sampler.eta=2: must be"),
    (["sampler.scheduler=euler"], "unknown sampler.scheduler 'euler'"),
    (["engine.batch_size=0"], "engine.batch_size=0: must be"),
    (["engine.compile=yes"], "engine.compile='yes': must be true or false"),
    (["report.alpha=2"], "report.alpha=2: must be a finite number > 0 and < 1"),
    (["report.alpha=0"], "report.alpha=0"),
    (["report.alpha=nan"], "report.alpha=nan"),
    (["report.grid_prompts=-1"], "report.grid_prompts=-1"),
    # methods' settings, declared next to each method
    ([*M, "method.settings.lamb=-1"], "method.settings.lamb=-1: must be a finite number >= 0"),
    ([*M, "method.settings.lamb=abc"], "method.settings.lamb='abc'"),
    ([*M, "method.settings.erase_scale=nan"], "method.settings.erase_scale=nan"),
    ([*M, "method.settings.variant=papr"], "did you mean 'paper'"),
    ([*M, "+method.settings.foo=1"], "unknown setting 'foo' in method.settings; valid choices"),
    ([*FIA, "method.settings.r2=inf"], "method.settings.r2=inf"),
    ([*FIA, "method.settings.r1=-0.5"], "method.settings.r1=-0.5"),
    ([*FIA, "method.settings.alpha=abc"], "method.settings.alpha='abc'"),
    ([*FIA, "method.settings.saliency_steps=0"], "method.settings.saliency_steps=0"),
    ([*FIA, "method.settings.layer=ffn3"], "unknown method.settings.layer 'ffn3'"),
    ([*FIA, "method.settings.r2_overrides={church: 2}"], "method.settings.r2_overrides.church=2"),
    ([*FIA, "method.settings.tasks.objects.r2=-1"], "method.settings.tasks.objects.r2=-1"),
    ([*SCAPRE, "method.settings.erase_scale=-1"], "method.settings.erase_scale=-1"),
    ([*SCAPRE, "method.settings.mi_temperature=0"], "method.settings.mi_temperature=0"),
    ([*SCAPRE, "method.settings.solver=lu"], "unknown method.settings.solver 'lu'"),
    ([*ESD, "method.settings.iterations=0"], "method.settings.iterations=0"),
    ([*ESD, "method.settings.lr=nan"], "method.settings.lr=nan"),
    ([*ESD, "method.settings.train=esd-z"], "unknown method.settings.train 'esd-z'"),
    ([*MASK, "method.settings.lr=-1"], "method.settings.lr=-1"),
    ([*MASK, "method.settings.epochs=1.5"], "method.settings.epochs=1.5"),
    ([*MASK, "method.settings.update_percent=2"], "method.settings.update_percent=2"),
    ([*MASK, "method.settings.kd=abc"], "method.settings.kd='abc': must be null or true or false"),
    (["method.name=nonne"], "did you mean 'none'"),
    # evaluators, attacks and prompt datasets
    (["evaluator=[fid]", "evaluator.fid.settings.batch_size=0"], "fid.settings.batch_size=0"),
    (["evaluator=[fid]", "evaluator.fid.settings.features=pixels"], "unknown evaluator.fid"),
    (["evaluator.clip_accuracy.settings.templates=[]"], "clip_accuracy.settings.templates=[]"),
    (["evaluator=[clip_acuracy]"], "clip_acuracy"),
    (["attack=[ring_a_bell]", *DETECTOR, "attack.ring_a_bell.settings.eta=inf"], "eta=inf"),
    (["attack=[unlearndiffatk]", *DETECTOR, "attack.unlearndiffatk.settings.lr=-1"], "lr=-1"),
    (["attack=[mma_diffusion]", *DETECTOR, "attack.mma_diffusion.settings.topk=0"], "topk=0"),
    (["attack=[prompt_replay]", "evaluator=[clip_score]"], "judge.evaluator='clip_accuracy'"),
    (["task.prompts.settings.per_concept=0"], "task.prompts.settings.per_concept=0"),
    (["task.prompts.settings.per_concept=abc"], "task.prompts.settings.per_concept='abc'"),
    (["+task.prompts.settings.foo=1"], "unknown setting 'foo' in task.prompts.settings"),
    (["task.prompts.dataset=templatez"], "unknown dataset 'templatez'"),
    ([*CSV_TASK, "+task.prompts.settings.path={tmp}/huge_seed.csv"], "0..2**62-1"),
    ([*CSV_TASK, "+task.prompts.settings.path={tmp}/float_seed.csv"], "must be an integer"),
    ([*CSV_TASK, "+task.prompts.settings.path={tmp}/binary.csv"], "not UTF-8"),
    # the command line's grammar, keys and groups
    (["seeds=[1,"], "'seeds=[1,' is not a valid override"),
    (["sampler.stepz=3"], "unknown config key 'sampler.stepz'"),
    (["method=uec"], "unknown method 'uec'"),
    (["preset=null,smoke"], "cannot sweep a config group over null"),
    # code named on the command line is refused
    (["+hydra.callbacks.x._target_=os.makedirs"], "never by import path"),
    (["+method._target_=os.system"], "never by import path"),
    (["+hydra={callbacks: {x: {_target_: os.system}}}"], "never by import path"),
    (["hydra.searchpath=[file://{tmp}/code_conf]"], "_target_ is refused; configs from"),
    (["+hydra.searchpath=[file://{tmp}/a_file]"], "a_file is not a folder"),
    (["hydra.searchpath=[pkg://no_such_package]"], "no installed package 'no_such_package'"),
    (["hydra.searchpath=[s3://bucket]"], "unknown scheme 's3'; valid choices: file, pkg"),
    (["--config-dir=/tmp"], "add config folders as hydra.searchpath=[file:///path/to/conf]"),
]


def write_inputs(tmp: Path) -> None:
    (tmp / "a_file").write_text("not a folder")
    header = "case_id,prompt,evaluation_seed,concept\n"
    concepts = load_task("objects", "tiny").concepts
    rows = "".join(f"{i},a photo of a {c},{i},{c}\n" for i, c in enumerate(concepts[1:], 1))
    (tmp / "huge_seed.csv").write_text(f"{header}0,a tench,{10**23},tench\n{rows}")
    (tmp / "float_seed.csv").write_text(f"{header}0,a tench,1e23,tench\n{rows}")
    (tmp / "binary.csv").write_bytes(header.encode() + b"\xff\xfe\x00garbage\n")
    (tmp / "code_conf" / "method").mkdir(parents=True)
    (tmp / "code_conf" / "method" / "mine.yaml").write_text("name: uce\n_target_: os.system\n")


def preflight(overrides: list[str], tmp: Path) -> None:
    """What the command line does before it loads a model: the override checks, composition,
    then the runner up to ``load_model``."""
    check_overrides(overrides)
    cfg = fia_bench.compose(overrides)
    if not any(o.startswith("out_dir=") for o in overrides):
        with open_dict(cfg):
            cfg.out_dir = str(tmp / "run")
    runner.run(cfg)


class ModelLoaded(Exception):
    pass


@pytest.fixture
def tripwire(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_model(*_: object, **__: object) -> None:
        raise ModelLoaded

    monkeypatch.setattr(runner, "load_model", load_model)


@pytest.mark.parametrize(("overrides", "message"), CLI_CASES, ids=lambda v: str(v)[:60])
def test_bad_command_line_fails_in_one_line_before_any_model_loads(
    overrides: list[str], message: str, tmp_path: Path, cache_dir: Path, tripwire: None
) -> None:
    write_inputs(tmp_path)
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    with pytest.raises(FiaBenchError) as caught:  # the tripwire raises ModelLoaded, not this
        preflight(overrides, tmp_path)
    text = str(caught.value)
    assert message.replace("{tmp}", str(tmp_path)) in text
    assert "\n" not in text


def test_a_good_command_line_reaches_the_model_loader(
    tmp_path: Path, cache_dir: Path, tripwire: None
) -> None:
    """The tripwire is what stops a valid configuration, so the cases above are not refused by
    an over-strict check of the defaults."""
    for overrides in ([], [*FIA], [*SCAPRE], [*ESD], [*MASK], ["attack=all", *DETECTOR]):
        with pytest.raises(ModelLoaded):
            preflight(overrides, tmp_path)


# ---- fia_bench.report ------------------------------------------------------------------------
def write_run(folder: Path, prompts: tuple[str, ...] = ("p0", "p1")) -> Path:
    """A small, valid run directory: two methods, two seeds, two prompts, one metric."""
    folder.mkdir(parents=True)
    records, runs = [], []
    for method in ("none", "uce"):
        for seed in (0, 1):
            for i, prompt_id in enumerate(prompts):
                records.append(
                    dict.fromkeys(RECORD_COLUMNS, "x")
                    | {
                        "method": method,
                        "n_concepts": 1,
                        "seed": seed,
                        "concept": "tench",
                        "role": "forget",
                        "prompt_id": prompt_id,
                        "evaluator": "clip_accuracy",
                        "metric": "accuracy",
                        "value": 100.0 * ((i + seed) % 2),
                        "higher_is_better": True,
                        "image_key": "",
                    }
                )
            runs.append(
                dict.fromkeys(RUN_COLUMNS, "")
                | {
                    "method": method,
                    "n_concepts": 1,
                    "seed": seed,
                    "status": "ok",
                    "metrics": declared("clip_accuracy/accuracy", ["p0", "p1"]),
                }
            )
    pd.DataFrame(records, columns=RECORD_COLUMNS).to_csv(folder / "records.csv", index=False)
    pd.DataFrame(runs, columns=RUN_COLUMNS).to_csv(folder / "runs.csv", index=False)
    manifest = {"config": {"cache_dir": str(folder / "cache")}, "inputs": {"model_weights": "ab"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def edit_csv(path: Path, column: str, row: int, value: str) -> None:
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)


REPORT_CASES = [
    ("missing folder", lambda run: run.with_name("elsewhere"), [], "not a fia_bench run dir"),
    (
        "garbled records",
        lambda run: (run / "records.csv").write_bytes(b"\x00\xff\x13garbage\n\x01"),
        [],
        "records.csv",
    ),
    (
        "records without a value column",
        lambda run: (
            pd.read_csv(run / "records.csv")
            .drop(columns="value")
            .to_csv(run / "records.csv", index=False)
        ),
        [],
        "missing column(s) value",
    ),
    ("seed 1e23", lambda run: edit_csv(run / "records.csv", "seed", 2, "1e23"), [], ":4: seed="),
    ("seed abc", lambda run: edit_csv(run / "records.csv", "seed", 0, "abc"), [], ":2: seed='abc'"),
    ("value abc", lambda run: edit_csv(run / "records.csv", "value", 1, "abc"), [], "value='abc'"),
    (
        "direction maybe",
        lambda run: edit_csv(run / "records.csv", "higher_is_better", 0, "maybe"),
        [],
        "higher_is_better='maybe'",
    ),
    (
        "truncated runs",
        lambda run: (run / "runs.csv").write_text("method,n_conc"),
        [],
        "runs.csv: missing column(s)",
    ),
    ("runs seed 2.5", lambda run: edit_csv(run / "runs.csv", "seed", 0, "2.5"), [], "seed='2.5'"),
    ("garbled manifest", lambda run: (run / "manifest.json").write_text("{"), [], "not JSON"),
    ("empty manifest", lambda run: (run / "manifest.json").write_text("{}"), [], "not a fia_bench"),
    (
        "one prompt twice, another missing",  # the merge keeps identical rows once
        lambda run: (
            edit_csv(run / "records.csv", "prompt_id", 1, "p0")
            or edit_csv(run / "records.csv", "value", 1, "0.0")
        ),
        [],
        "none n_concepts=1 seed=0 clip_accuracy/accuracy: 1 of 2 values",
    ),
    (
        "an undeclared prompt in place of a declared one",
        lambda run: edit_csv(run / "records.csv", "prompt_id", 1, "p9"),
        [],
        "the scored prompts are not the declared ones",
    ),
    ("alpha 2", lambda run: None, ["--alpha", "2"], "--alpha 2.0: must be"),
    ("alpha abc", lambda run: None, ["--alpha", "abc"], "invalid float value: 'abc'"),
    ("grid -1", lambda run: None, ["--grid-prompts", "-1"], "--grid-prompts -1"),
]


@pytest.mark.parametrize(
    ("damage", "flags", "message"),
    [case[1:] for case in REPORT_CASES],
    ids=[case[0] for case in REPORT_CASES],
)
def test_bad_report_input_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, damage, flags: list[str], message: str
) -> None:
    run = write_run(tmp_path / "run")
    target = damage(run)
    folder = target if isinstance(target, Path) else run
    try:
        code = report_main([str(folder), "--out", str(tmp_path / "out"), *flags])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_the_valid_report_run_merges(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(write_run(tmp_path / "run")), "--out", str(tmp_path / "out")]) == 0
    assert "uce" in capsys.readouterr().out


def test_an_unforeseen_error_is_one_line_naming_its_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from fia_bench import cli

    def broken(cfg: object, preset: str | None = None) -> None:
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(runner, "run", broken)
    argv = ["fia_bench", "model=tiny_random", f"hydra.run.dir={tmp_path}", f"out_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    log = tmp_path / "error.log"
    assert err == (
        f"fia_bench: internal error: RuntimeError: something nobody foresaw (full trace in {log})"
    )
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
