#!/usr/bin/env bash
# The real-model benchmark end to end on CPU: the learning-rate pilot, the rates frozen into conf/real_method/,
# the sweep, and the results in experiments/results/real/. Run from the repository root after
# `make install` and `pip install -e '.[real]'`; `--out DIR` puts the sweeps under DIR (default outputs/).
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs
if [[ "${1:-}" == "--out" ]]; then out="$2"; fi
bin=.venv/bin
stamp() { date +%Y-%m-%d_%H-%M-%S; }
start=$(date +%s)
pilot="$out/bench_real_pilot/$(stamp)"
$bin/grass-train -m experiment=bench_real_pilot "paths.output_dir=$pilot"
$bin/python experiments/collect_results.py "$pilot" --preset real_pilot
$bin/python experiments/freeze_pilot_rates.py experiments/results/real/pilot.json conf/real_method
sweep="$out/bench_real/$(stamp)"
$bin/grass-train -m experiment=bench_real "paths.output_dir=$sweep"
$bin/python experiments/collect_results.py "$sweep" --preset real
echo "pilot and sweep took $(( ($(date +%s) - start) / 60 )) min: $pilot, $sweep"
