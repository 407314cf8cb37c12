"""The one-call GPU check, on the CPU: `experiments/gpu_check.sh --smoke --out DIR` runs the benchmark's code path;
with a stand-in interpreter, the order of its parts, their time limits and where its results go."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


#: The benchmark's rows in the order they run: first those no run had measured anywhere, then the confirming ones.
ORDER = [
    "grass_chunked_bf16",
    "fsdp_stream_bf16",
    "grass_stream_bf16",
    "grass_stream_sync_bf16",
    "grass_cpu_bf16",
    "grass_cpu_bf16_unchecked",
    "grass_none_bf16",
    "lisa_bf16",
    "full_bf16",
    "grass_cpu_fp32",
    "full_fp32",
    "fsdp_cpu_fp32",
    "fsdp_none_fp32",
]


@pytest.mark.slow  # 110 to 260 s: run it with -m slow after changing gpu_check.sh, bench_gpu.py or offload_runs.py
def test_the_smoke_run_writes_the_gpu_table(tmp_path):
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    # A relative --out is taken from the folder the command was started in.
    command = ["bash", str(REPO / "experiments" / "gpu_check.sh"), "--smoke", "--out", "results/gpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "results" / "gpu"
    first = result.stdout.splitlines()[0]
    assert first.startswith("machine: CUDA no (") and first.endswith("; host registration: n/a (no CUDA)"), first
    assert (out / "machine.txt").read_text() == first + "\n"
    parts = re.findall(r"^time: (.*?)(?: \d+ s| not run)", result.stdout, flags=re.MULTILINE)
    assert parts == [
        "probe",
        *ORDER[:4],
        "benchmark (never-run rows)",
        "real-model comparison",
        *ORDER[4:],
        "benchmark (confirming rows)",
        "total",
    ]
    assert "time: real-model comparison not run (--smoke)" in result.stdout
    text = (out / "results.md").read_text()
    assert f"Machine: {first.removeprefix('machine: ')}" in text
    assert "| peak allocated (GiB) | peak reserved (GiB) |" in text
    rows = [line for line in text.splitlines() if re.match(r"\| (full|lisa|grass|fsdp)_", line)]
    assert [row.split(" | ")[0][2:] for row in rows] == ORDER
    assert all(row.split(" | ")[2].startswith("passed") for row in rows)
    assert all("nan" not in row for row in rows)
    assert all(row.split(" | ")[5] == "-" for row in rows), "no reserved memory on the CPU, in every row"
    records = json.loads((out / "records.json").read_text())
    assert list(records) == ORDER and all(runs[0]["peak_reserved_bytes"] is None for runs in records.values())
    for name in ("grass_stream_bf16", "fsdp_stream_bf16"):
        streamed = next(row for row in rows if row.startswith(f"| {name} "))
        assert streamed.split(" | ")[3].endswith("KiB"), f"{name}: the budget computed in the run's process is shown"
        assert float(streamed.split(" | ")[-3]) > 0, f"{name}: per-tensor streaming fetched states at every step"
    chunked = next(row for row in rows if row.startswith("| grass_chunked_bf16 "))
    # 320 KiB holds a block's largest tensor (264 KiB while stepped) but not the embedding or the head (384 KiB):
    # those two are stepped in chunks of at most half the budget, 106 of their 256 rows.
    assert chunked.split(" | ")[1].startswith("grass, n_active=2; offload=cpu; offload_always_on=True; budget 320.00")
    assert (
        chunked.split(" | ")[2]
        == "passed; 2 tensors stepped in chunks of rows, the largest (384.00 KiB while stepped) in 3"
    )
    assert chunked.split(" | ")[3] == "320.00 KiB"
    assert float(chunked.split(" | ")[-3]) > 0, "the embedding's and head's chunks were fetched at every step"
    assert "`grass_chunked_bf16` offloads the embeddings', head's and final norm's states too" in text
    fsdp = [row for row in rows if row.startswith("| fsdp_")]
    assert len(fsdp) == 3
    for row in fsdp:
        assert "checkpoint saved at step 8, resumed at step 8, trained to step 12" in row
        assert float(row.split(" | ")[-4]) > 0, "grass_fsdp reports its peak state on the device"
    for row in fsdp[:2]:
        assert float(row.split(" | ")[-2]) >= 0, "grass_fsdp offloading to cpu reports the host's wait"
    assert re.search(r"Overlapped against synchronous transfers, .*: \d+\.\d{3}x the throughput", text)
    assert re.search(r"Step time with skip_non_finite's per-step read against without it .*: \d+\.\d{3}x\.", text)
    assert "CUDA tests (`pytest -m cuda tests/strategies tests/offload`): not run (--smoke)." in text


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the interpreter: notes each command, prints a probe's line, and does nothing else.
echo "$*" >> "$CALLS"
case "$*" in
    *probe_device.py*)
        if [ "$FAKE_CUDA" = broken ]; then echo "ImportError: libcudart.so.12" >&2; exit 1; fi
        echo "machine: CUDA $FAKE_CUDA (fake); NCCL works (fake); host registration works (fake)"
        if [ "$FAKE_CUDA" = no ] && [ "${2:-}" = --require-cuda ]; then exit 3; fi ;;
esac
"""


def fake_check(tmp_path, *arguments, cuda="yes", out=None):
    """gpu_check.sh with a stand-in interpreter, started in tmp_path/start: its result and the commands it ran."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    data = tmp_path / "llm-adapters"
    data.mkdir(exist_ok=True)
    started_in = tmp_path / "start"
    started_in.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {"PYTHON": str(python), "PATH": "/usr/bin:/bin", "CALLS": str(calls), "FAKE_CUDA": cuda}
    env |= {"LLM_ADAPTERS_ROOT": str(data)} | ({} if out is None else {"OUT": out})
    command = ["bash", str(REPO / "experiments" / "gpu_check.sh"), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=started_in)
    return result, calls.read_text().splitlines() if calls.exists() else []


def option(call, name):
    words = call.split(" ")
    return words[words.index(name) + 1]


def test_the_check_runs_the_tests_and_the_never_run_rows_before_the_confirming_ones(tmp_path):
    result, calls = fake_check(tmp_path, "--out", "results/gpu")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.splitlines()[0] == "machine: CUDA yes (fake); NCCL works (fake); host registration works (fake)"
    )
    out = tmp_path / "start" / "results" / "gpu"
    assert (out / "machine.txt").read_text().startswith("machine: CUDA yes (fake)")
    assert (out / "cuda_tests.txt").exists()
    probe, tests, has_model, never_run, real, collect, confirming = calls
    assert probe == "experiments/probe_device.py --require-cuda"
    assert tests.startswith("-m pytest") and tests.endswith("-m cuda tests/strategies tests/offload")
    assert has_model.startswith("-c import importlib.util")
    assert never_run.startswith(f"experiments/bench_gpu.py --out {out} ") and "--group never_run" in never_run
    assert real.startswith("-m lightning_grass.app.train -m experiment=bench_real_gpu seed=0 hydra.launcher.jobs=10")
    assert collect.startswith(f"experiments/collect_results.py {out}/real/sweep --preset real")
    assert confirming.startswith(f"experiments/bench_gpu.py --out {out} ")
    assert confirming.endswith("--group confirming --resume --time-limit " + option(confirming, "--time-limit"))
    assert "--machine CUDA yes (fake); NCCL works (fake); host registration works (fake)" in never_run
    # Every part within 450 s: the never-run rows leave the real-model part its 90 s, its kill's grace and its
    # collection, and each benchmark invocation its start-up.
    assert 300 <= int(option(never_run, "--time-limit")) <= 450 - 15 - (90 + 10 + 15)
    assert 400 <= int(option(confirming, "--time-limit")) <= 450 - 15
    assert option(never_run, "--timeout") == "150"


def test_out_defaults_to_the_out_variable_and_smoke_runs_no_tests(tmp_path):
    result, calls = fake_check(tmp_path, "--smoke", out=str(tmp_path / "returned"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("machine: CUDA yes (fake)")
    probe, never_run, confirming = calls
    assert probe == "experiments/probe_device.py", "on the CPU the probe does not require CUDA"
    assert never_run.startswith(f"experiments/bench_gpu.py --smoke --out {tmp_path / 'returned'} ")
    assert "--group never_run" in never_run and "--group confirming --resume" in confirming
    assert "time: real-model comparison not run (--smoke)" in result.stdout
    # --out wins over OUT, and a relative one is taken from where the command started.
    result, calls = fake_check(tmp_path, "--smoke", "--out", "mine", out=str(tmp_path / "returned"))
    assert f"--out {tmp_path / 'start' / 'mine'} " in calls[1]


def test_without_out_or_cuda_the_check_stops_before_it_starts(tmp_path):
    result, calls = fake_check(tmp_path)
    assert result.returncode == 2 and calls == []
    assert "error: give --out DIR, or set OUT (on a lent machine only $OUT comes back)" in result.stderr
    result, calls = fake_check(tmp_path, "--out", "x", cuda="no")
    assert result.returncode == 1 and calls == ["experiments/probe_device.py --require-cuda"]
    assert result.stdout.splitlines() == ["machine: CUDA no (fake); NCCL works (fake); host registration works (fake)"]
    assert "error: no CUDA device on this machine" in result.stderr


def test_a_probe_that_fails_still_gives_the_first_line_and_the_check_goes_on(tmp_path):
    result, calls = fake_check(tmp_path, "--smoke", "--out", "x", cuda="broken")
    out = tmp_path / "start" / "x"
    line = f"machine: not known, the probe failed with exit status 1 ({out}/machine_errors.txt)"
    assert result.returncode == 0 and result.stdout.splitlines()[0] == line
    assert (out / "machine_errors.txt").read_text() == "ImportError: libcudart.so.12\n"
    assert [call.split(" ")[0] for call in calls] == ["experiments/probe_device.py", *["experiments/bench_gpu.py"] * 2]


def test_unknown_arguments_are_refused():
    result = subprocess.run(
        ["bash", str(REPO / "experiments" / "gpu_check.sh"), "--fast"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "error: unknown argument --fast" in result.stderr
