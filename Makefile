# Every target creates .venv on first use, so a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM ?= false
# `make run` compares UCE with the unedited model; `make run ARGS="method=none seeds=1"` overrides.
RUN_ARGS := method=uce seeds=3
comma := ,

.PHONY: install run test wheel-smoke bench lint clean mini-world mini-world-card mini-world-probe results-mini \
	results-mini-explicit comparisons-mini

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m fia_bench $(or $(ARGS),$(RUN_ARGS))

# Tests never touch the network: hub downloads and wandb uploads are off. One worker per core
# (pytest-xdist), a test file per worker at a time so module fixtures are built once.
TEST_WORKERS ?= auto
test: export HF_HUB_OFFLINE := 1
test: export WANDB_MODE := offline
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The wheel as users install it: built, installed through constraints.txt into a fresh venv and run
# once from outside the checkout (.ci/wheel_smoke; CI runs it after make test)
wheel-smoke: $(STAMP)
	.ci/wheel_smoke $(PY) $(PYTHON)

# Train the mini world from scratch (resumable: run again after an interruption, or in chunks
# with ARGS="--max-minutes 5"), then re-measure its model card.
mini-world: $(STAMP)
	$(PY) -m fia_bench.miniworld train --build .mini_world_build $(ARGS)

mini-world-card: $(STAMP)
	$(PY) -m fia_bench.miniworld evaluate $(ARGS)

# The generator variants of fia_bench/miniworld/variants.yaml, trained side by side on the build's
# renders, VAE and judges and measured (sublayer rows, cost, grids): how the recipe's UNet is
# chosen. Meant for a GPU: ARGS="--minutes 6" bounds each variant.
mini-world-probe: $(STAMP)
	$(PY) -m fia_bench.miniworld.probe --build .mini_world_build $(ARGS)

# The five seed-paper methods on the mini world (docs/results_mini.md), each twice: at its papers'
# settings and at its mini preset (preset=mini, docs/mini_presets.md), 1 to 50 objects, 3 seeds,
# merged into one report. Runs are cached, so it can be built a few methods at a time:
# make results-mini METHODS=fia,uce; any other method plugin joins the same way
# (METHODS=conceptprune,mace,speed,rece,ac,fmn,salun,sld,safree).
# The closed forms (uce, scapre, speed, rece) and pruning (fia, conceptprune) erase in seconds;
# sld and safree edit nothing and cost up to 1.5x the UNet work on every image they make. The
# fine-tuning methods take minutes per erasure on 2 CPU cores (benchmarks/README.md, README.md):
# esd 4-6 min, dynamic_mask about 1 min per concept, fmn and mace under half a minute, ac about
# 6 min (5 of them its anchor images, cached after the first erasure) and salun about 5 min (half
# of it its forget and retain images, also cached).
RESULTS_MINI := multirun/results_mini
METHODS ?= fia,scapre,dynamic_mask,esd,uce
MINI_SWEEP := $(PY) -m fia_bench -m experiment=results_mini method=$(METHODS)
results-mini: $(STAMP)
	$(MINI_SWEEP) hydra.sweep.dir=$(RESULTS_MINI)/papers/$(subst $(comma),_,$(METHODS)) $(ARGS)
	$(MINI_SWEEP) preset=mini \
		hydra.sweep.dir=$(RESULTS_MINI)/mini/$(subst $(comma),_,$(METHODS)) $(ARGS)
	$(PY) -m fia_bench.report $(RESULTS_MINI)/*/*/*/ --out docs/results_mini --gzip-records \
		--markdown docs/results_mini.md

# UCE on the mini world's hazard task with every explicit-content evaluator and the three
# attacks at CPU-sized search budgets (docs/results_mini_explicit.md; about 10 minutes on 2 cores)
# (the attack budgets of experiments/mini_cpu_budgets.yaml, read when the recipe runs)
CPU_ATTACKS = $(shell $(PY) -c "import yaml; \
	print(' '.join(yaml.safe_load(open('experiments/mini_cpu_budgets.yaml'))['attacks']))")
results-mini-explicit: $(STAMP)
	$(PY) -m fia_bench method=uce task=explicit model=mini seeds=3 \
		'evaluator=[detector,fid,clip_score]' attack=all $(CPU_ATTACKS) \
		out_dir=multirun/results_mini_explicit $(ARGS)
	$(PY) -m fia_bench.report multirun/results_mini_explicit --out docs/results_mini_explicit \
		--markdown docs/results_mini_explicit.md

# Every paper-table recipe's mini analogue at full mini size, its comparison report written to
# docs/comparisons/mini/ (methods and attacks at the CPU budgets of
# experiments/mini_cpu_budgets.yaml); one recipe at a time: make comparisons-mini RECIPES=fia/table1
RECIPES ?=
comparisons-mini: $(STAMP)
	$(PY) experiments/mini_comparisons.py $(RECIPES)

bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun build .wheel-smoke
