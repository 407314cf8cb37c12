#!/usr/bin/env bash
# The one-call GPU check: the CUDA tests, then the GPU benchmark, which writes experiments/results/gpu/results.md.
#   bash experiments/gpu_check.sh                      # on a machine with a GPU, from anywhere in the repository
#   bash experiments/gpu_check.sh --smoke --out DIR    # the benchmark's code path on the CPU at tiny size, no tests
# It uses .venv/bin/python when there is one, else python3 with the checkout on PYTHONPATH (a machine whose
# image already has torch, lightning and transformers). PYTHON=... picks another interpreter.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo:$repo/experiments${PYTHONPATH:+:$PYTHONPATH}"
smoke=()
out="$repo/experiments/results/gpu"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=(--smoke); shift ;;
        --out) out="$2"; shift 2 ;;
        *) echo "error: unknown argument $1; use --smoke and --out DIR" >&2; exit 2 ;;
    esac
done
if [ ${#smoke[@]} -eq 0 ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/strategies tests/offload
fi
"$PYTHON" experiments/bench_gpu.py "${smoke[@]}" --out "$out"
