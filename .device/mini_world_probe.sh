#!/usr/bin/env bash
# Issue 16 on a lent GPU machine (the workplace's device tool; CI never runs this). From the
# repository root there, with the wheels the machine lacks carried in .whl (make-wheels below,
# run here first), it renders the committed build's data again, trains the generator variants
# of fia_bench/miniworld/variants.yaml side by side for MINUTES each, measures each one's
# sublayer rows and grid, and leaves under $OUT: probe.json, probe.md, grids.png and the best
# variant's generator weights (generator_<variant>.safetensors).
#
#   here:  bash .device/mini_world_probe.sh make-wheels
#   there: bash .device/mini_world_probe.sh [MINUTES [probe options]]   (device run, carry .whl)
#          e.g. bash .device/mini_world_probe.sh 4.5 --only b256 b1024
# MINUTES (default 4.5) is the training time the variants share, plus up to a minute for their
# start; rendering, timing and measuring take about 3 more, inside the 10-minute command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = make-wheels ]; then
    # the versions constraints.txt pins; the machine has torch, transformers and the rest
    mkdir -p .whl
    for wheel in diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 open_clip_torch==3.3.0 \
        ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d .whl "$wheel"
    done
    python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl  # an sdist only
    exit 0
fi
minutes=${1:-4.5}
shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
probe=(python3 -m fia_bench.miniworld.probe --root /tmp/probe --out /tmp/probe/out)
status=0
# a device command may run 10 minutes: stop in time to gather what was measured
timeout 540 "${probe[@]}" --build .mini_world_build --minutes "$minutes" --device cuda "$@" ||
    status=$?
[ -f /tmp/probe/out/probe.json ] || "${probe[@]}" --collect || true
cp /tmp/probe/out/* "$OUT/" 2>/dev/null || true
# each variant's log ends with its step rate (tqdm's carriage returns made lines)
for log in /tmp/probe/*.log; do
    echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^\s*$' | tail -3
done
exit "$status"
