#!/usr/bin/env bash
# The figures only a GPU gives, in one run from the repository root on a machine with a CUDA build of torch and the
# project installed (pip install -e ".[test,video]" without reinstalling torch):
#   1. the test suite, whose CUDA-only tests run there (engine, compiled and CUDA-graph targets, bench and demos on
#      cuda, phase timing with CUDA events);
#   2. zoo-speed on the GPU (docs/results/zoo-speed-gpu.toml: bfloat16, eager and CUDA-graph decode steps);
#   3. the raw step costs (target step, verification of 5 / 16 tokens, a draft call) per dtype;
#   4. the draft-tree costs there and the tree shapes predicted fastest for the EAGLE head (experiments/tree_profile.py
#      --costs, bfloat16);
#   5. the continuous bench (MAR zoo, CSpD and the exact rule) at batch 1 / 8 / 64 / 256.
# Everything lands under OUT (default docs/results/gpu) with machine.json naming the GPU. QUICK=1: a few-minute smoke
# run (device tests only, the zoo-quick preset, one pass of step costs, the continuous smoke). DEVICE=cpu runs the
# same commands on the CPU (to check the script itself).
#   bash experiments/gpu_figures.sh
set -euo pipefail
OUT=${OUT:-docs/results/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
step() { echo "== $* ($(date +%H:%M:%S))"; }

step machine
python - "$DEVICE" > "$OUT/machine.json" <<'PY'
import json, platform, sys
import torch
from specdec.devices import use_device
device = use_device(sys.argv[1])
print(json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}))
PY
cat "$OUT/machine.json"

step tests
if [ "$QUICK" = 1 ]; then tests="tests/test_devices.py tests/test_compiled.py"; else tests="tests"; fi
python -m pytest $tests -q -p no:cacheprovider > "$OUT/tests.txt" 2>&1 || echo "tests failed: see $OUT/tests.txt"
tail -3 "$OUT/tests.txt"                     # a failing test is reported, and the figures are still measured

step zoo-speed
if [ "$QUICK" = 1 ]; then
    specdec bench --preset zoo-quick --device "$DEVICE" --out "$OUT/zoo-quick.jsonl" --no-progress
else
    specdec bench docs/results/zoo-speed-gpu.toml --device "$DEVICE" --out "$OUT/zoo-speed-gpu.jsonl" --no-progress
fi

step step-costs
passes=3; [ "$QUICK" = 1 ] && passes=1
python experiments/precision_costs.py --device "$DEVICE" --passes "$passes" --out "$OUT/precision-costs.json"

step tree-costs
python experiments/tree_profile.py --costs --from-card --device "$DEVICE" --dtype bfloat16 > "$OUT/tree-costs.txt"
tail -13 "$OUT/tree-costs.txt"
python experiments/tree_profile.py --costs --from-card --device "$DEVICE" --dtype bfloat16 --compile cuda-graphs \
    > "$OUT/tree-costs-cuda-graphs.txt"
tail -13 "$OUT/tree-costs-cuda-graphs.txt"

step continuous
if [ "$QUICK" = 1 ]; then
    python experiments/bench_continuous.py --device "$DEVICE" --smoke --out "$OUT/continuous-smoke"
else
    python experiments/bench_continuous.py --device "$DEVICE" --dtype bfloat16 --out "$OUT/continuous" \
        --batches 1,8,64,256 --rounds 3 --quality-images 8 --gammas 4 --exact-gammas 1 --frozen-windows 2,4 \
        --acceptance-gammas "" --acceptance-windows ""
fi
step done
