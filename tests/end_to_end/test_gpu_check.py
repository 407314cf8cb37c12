"""The one-call GPU check, on the CPU: `experiments/gpu_check.sh --smoke --out DIR` runs the benchmark's code path."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # 195 s: run it with -m slow after changing gpu_check.sh, bench_gpu.py or offload_runs.py
def test_the_smoke_run_writes_the_gpu_table(tmp_path):
    out = tmp_path / "results" / "gpu"
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    command = ["bash", str(REPO / "experiments" / "gpu_check.sh"), "--smoke", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = (out / "results.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| (full|lisa|grass|fsdp)_", line)]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "full_fp32",
        "full_bf16",
        "lisa_bf16",
        "grass_none_bf16",
        "grass_cpu_bf16",
        "grass_cpu_bf16_unchecked",
        "grass_cpu_fp32",
        "grass_stream_bf16",
        "grass_stream_sync_bf16",
        "grass_chunked_bf16",
        "fsdp_none_fp32",
        "fsdp_cpu_fp32",
        "fsdp_stream_bf16",
    ]
    assert all(row.split(" | ")[2].startswith("passed") for row in rows)
    assert all("nan" not in row for row in rows)
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
    for row in rows[-3:]:
        assert "checkpoint saved at step 8, resumed at step 8, trained to step 12" in row
        assert float(row.split(" | ")[-4]) > 0, "grass_fsdp reports its peak state on the device"
    for row in rows[-2:]:
        assert float(row.split(" | ")[-2]) >= 0, "grass_fsdp offloading to cpu reports the host's wait"
    assert re.search(r"Overlapped against synchronous transfers, .*: \d+\.\d{3}x the throughput", text)
    assert re.search(r"Step time with skip_non_finite's per-step read against without it .*: \d+\.\d{3}x\.", text)
    assert "CUDA tests (`pytest -m cuda tests/strategies tests/offload`): not run (--smoke)." in text
    for part in ("full_fp32", "fsdp_cpu_fp32", "fsdp_stream_bf16", "benchmark", "total"):
        assert re.search(rf"^time: {part} \d+ s", result.stdout, re.MULTILINE), part


def test_unknown_arguments_are_refused():
    result = subprocess.run(
        ["bash", str(REPO / "experiments" / "gpu_check.sh"), "--fast"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "error: unknown argument --fast" in result.stderr
