#!/usr/bin/env bash
# The GPU checks of a lent device session, prepared so that none of its minutes go to typing.
# A lent machine has PyTorch and transformers but not the rest of our dependencies, and no
# network: the wheels travel in .whl/ (git-ignored), and the checkout runs from PYTHONPATH.
#
#   bash benchmarks/device_session.sh wheels   # here, once: download the wheels into .whl/
#   bash benchmarks/device_session.sh run      # there (device `run`, carry [".whl"]):
#                                              # about 8 minutes on an H200, results in $OUT
#
# `run` measures, in order of what is least known, each step's output kept in $OUT even when a
# later one fails: the compiled generator step with the fused AdamW that `Loop` now uses on a GPU
# (the mini world's build is host-bound, so launches are its lever), then the whole build
# projected with `--compile` (`--scale mini-train`), the number that says whether the mini world
# can be retrained within a lent session's minutes. The SD-scale benchmark was committed from the
# session of 2026-12-04 (benchmarks/results/bench_sd_cuda.md).
set -u -o pipefail

WHEELS=(
  diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 open_clip_torch==3.3.0 ftfy==6.3.1
  wcwidth==0.9.4 importlib_metadata==10.2.0
)

case "${1:-}" in
wheels)
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "${WHEELS[@]}"
  # antlr4's runtime, which omegaconf needs, is published as a source archive only
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
  ls .whl
  ;;
run)
  : "${OUT:?run this on the device machine, where OUT names the folder that comes back}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
  timeout 150 python3 -m benchmarks.generator_step --device cuda --steps 50 --compile \
    --out "$OUT/generator_step_compiled.json" 2>&1 | tee "$OUT/generator_step.log"
  timeout 330 python3 -m benchmarks --scale mini-train --device cuda --stage-steps 50 --compile \
    --out "$OUT" 2>&1 | tee "$OUT/bench_mini_train.log"
  ;;
*)
  echo "usage: bash benchmarks/device_session.sh wheels|run" >&2
  exit 2
  ;;
esac
