"""bench_gpu.py keeps what it gets: a failed configuration is a row beside the others' figures, written as runs end;
the configurations no run has measured come first, and a second invocation adds the rest to the same table."""

import json
import re

import bench_gpu
import pytest
import torch
from bench_gpu import GPU_SHAPE, NEVER_RUN, SMOKE_SHAPE, report
from offload_runs import CausalLM, Run, _budget

#: A passed record, as offload_runs.measure makes on the CPU.
STUB = {
    "failed": None,
    "wall_seconds": 1.0,
    "step_seconds": [0.1] * SMOKE_SHAPE.steps,
    "stats": {},
    "max_resident_bytes": None,
    "peak_memory_bytes": 2**30,
    "peak_reserved_bytes": None,
}


def test_the_chunked_run_streams_the_embedding_and_head_in_chunks_on_either_shape():
    (gpu,) = [run for run in bench_gpu.runs(GPU_SHAPE) if run.name == "grass_chunked_bf16"]
    assert (gpu.sampler, gpu.offload, gpu.precision, gpu.offload_always_on) == ("grass", "cpu", "bf16-true", True)
    assert gpu.max_resident_bytes == 256 * 2**20
    (smoke,) = [run for run in bench_gpu.runs(SMOKE_SHAPE) if run.name == "grass_chunked_bf16"]
    assert smoke.max_resident_bytes == 320 * 2**10
    # On the smoke model, in its process's terms: the embedding and head (384 KiB while stepped) in 3 chunks of at
    # most 106 rows, every block tensor (at most 264 KiB) whole.
    module = CausalLM(SMOKE_SHAPE, torch.bfloat16, "cpu")
    assert _budget(module, smoke) == {
        "max_resident_bytes": 320 * 2**10,
        "largest_tensor_bytes": 256 * 64 * 24 + 4,
        "largest_tensor_chunks": 3,
        "chunked_tensors": 2,
    }


def cells(text, name):
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split(" | ")]


def test_a_failed_configuration_is_a_row_beside_the_figures_of_the_others(tmp_path, monkeypatch):
    out = tmp_path / "new" / "gpu"
    good = Run("full_fp32", "full")
    # The strategy refuses a budget that cannot hold a tensor, at setup in the run's process.
    bad = Run("lisa_budget_1", "lisa", offload="cpu", max_resident_bytes=1)
    monkeypatch.setattr(bench_gpu, "runs", lambda shape: [good, bad])
    written = []
    measure = bench_gpu.measure

    def watched(*args, on_result, **kwargs):
        assert out.is_dir(), "--out is created before any run"
        written.append(("before", (out / "results.md").read_text()))

        def record_the_file(run, results):
            on_result(run, results)
            written.append((run.name, (out / "results.md").read_text()))

        return measure(*args, on_result=record_the_file, **kwargs)

    monkeypatch.setattr(bench_gpu, "measure", watched)
    assert bench_gpu.main(["--smoke", "--out", str(out)]) == 1, "a configuration failed"

    assert [name for name, _ in written] == ["before", "full_fp32", "lisa_budget_1"]
    before, after_first, final = (text for _, text in written)
    assert cells(before, "full_fp32")[2] == cells(before, "lisa_budget_1")[2] == "not run yet"
    assert cells(after_first, "full_fp32")[2] == "passed", "results.md held the first run before the second began"
    assert cells(after_first, "lisa_budget_1")[2] == "not run yet"
    assert final == (out / "results.md").read_text()

    failed = cells(final, "lisa_budget_1")
    assert failed[2].startswith(
        "failed: lightning_grass.errors.SettingValueError: max_resident_bytes=1 bytes (1 B) cannot hold"
    )
    assert failed[3:11] == ["-"] * 8
    passed = cells(final, "full_fp32")
    assert passed[2] == "passed"
    peak, median_step, tokens = float(passed[4]), float(passed[6]), float(passed[7].replace(",", ""))
    assert peak > 0 and median_step >= 0 and tokens > 0
    assert passed[5] == "-", "no reserved memory on the CPU"
    records = json.loads((out / "records.json").read_text())
    assert records["full_fp32"][0]["peak_reserved_bytes"] is None and records["full_fp32"][0]["failed"] is None
    assert records["lisa_budget_1"][0]["failed"] == failed[2].removeprefix("failed: ").replace("\\|", "|")
    assert "not measured: grass_stream_bf16 is not configured and grass_stream_sync_bf16 is not configured" in final


def test_the_report_renders_with_any_run_failed_or_pending():
    stream = dict(sampler="grass", offload="cpu", budget_tensors=2, precision="bf16-true")
    configurations = [
        Run("grass_stream_bf16", **stream),
        Run("grass_stream_sync_bf16", overlap=False, **stream),
        Run("fsdp_cpu_fp32", "lisa", offload="cpu", strategy="grass_fsdp"),
        Run("fsdp_stream_bf16", "lisa", offload="cpu", budget_tensors=2, precision="bf16-true", strategy="grass_fsdp"),
    ]
    steps = [0.5] * SMOKE_SHAPE.steps
    stats = {"peak_resident_bytes": 2**30, "bytes_to_device": 8 * 2**20 * SMOKE_SHAPE.steps, "host_wait_seconds": 0.8}
    passed = {
        "failed": None,
        "wall_seconds": 20.0,
        "step_seconds": steps,
        "stats": stats,
        "max_resident_bytes": 3 * 2**20,
        "peak_memory_bytes": 2 * 2**30,
        "peak_reserved_bytes": 3 * 2**30,
        "device": "NVIDIA H200",
    }
    failed = {"failed": "RuntimeError: CUDA out of memory | tried", "wall_seconds": 3.0}
    results = {"grass_stream_bf16": [passed], "grass_stream_sync_bf16": [failed]}
    text = report(
        SMOKE_SHAPE, configurations, results, "python experiments/bench_gpu.py", "exit status 0, 7 passed", "CUDA yes"
    )
    assert (
        "Device: NVIDIA H200." in text and "CUDA tests (`pytest -m cuda tests/strategies tests/offload`): exit" in text
    )
    assert "Machine: CUDA yes" in text
    assert cells(text, "grass_stream_bf16")[2:] == [
        "passed",
        "3.00 MiB",
        "2.00",
        "3.00",
        "500",
        "128",
        "1.000",
        "8",
        "100.0",
        "20",
    ]
    assert cells(text, "grass_stream_sync_bf16")[2] == r"failed: RuntimeError: CUDA out of memory \| tried"
    assert cells(text, "fsdp_cpu_fp32")[2] == cells(text, "fsdp_stream_bf16")[2] == "not run yet"
    assert "per-tensor streaming in bf16: not measured: grass_stream_sync_bf16 failed." in text

    results["grass_stream_sync_bf16"] = [{**passed, "step_seconds": [0.6] * SMOKE_SHAPE.steps}]
    fsdp_stats = {
        "peak_resident_bytes": 2**29,
        "bytes_to_device": 4 * 2**20 * SMOKE_SHAPE.steps,
        "host_wait_seconds": 0.4,
    }
    fsdp = {**passed, "stats": fsdp_stats, "max_resident_bytes": None, "wall_seconds": 30.0}
    resumed = {"saved_at_step": 8, "resumed_at_step": 8, "final_step": 12}
    results["fsdp_cpu_fp32"] = [{**fsdp, **resumed}]
    results["fsdp_stream_bf16"] = [{**fsdp, **resumed, "max_resident_bytes": 3 * 2**20}]
    text = report(SMOKE_SHAPE, configurations, results, "python experiments/bench_gpu.py", "not run")
    assert re.search(r"per-tensor streaming in bf16: 1\.200x the throughput", text)
    checkpointed = "passed; checkpoint saved at step 8, resumed at step 8, trained to step 12"
    figures = ["2.00", "3.00", "500", "128", "0.500", "4", "50.0", "30"]
    assert cells(text, "fsdp_cpu_fp32")[2:] == [checkpointed, "-", *figures], "grass_fsdp reports its peak and wait"
    assert cells(text, "fsdp_stream_bf16")[1:] == [
        "grass_fsdp on 1 rank, save and resume; lisa, n_active=2; offload=cpu; budget 2 largest block tensors while "
        "stepped; overlap=True; bf16-true",
        checkpointed,
        "3.00 MiB",
        *figures,
    ]

    chunked = Run("grass_chunked_bf16", "grass", offload="cpu", offload_always_on=True, max_resident_bytes=2**20)
    chunks = {"largest_tensor_bytes": 3 * 2**20, "largest_tensor_chunks": 6, "chunked_tensors": 2}
    results["grass_chunked_bf16"] = [{**passed, "max_resident_bytes": 2**20, **chunks}]
    text = report(SMOKE_SHAPE, [*configurations, chunked], results, "python experiments/bench_gpu.py", "not run")
    assert cells(text, "grass_chunked_bf16")[2:4] == [
        "passed; 2 tensors stepped in chunks of rows, the largest (3.00 MiB while stepped) in 6",
        "1.00 MiB",
    ]
    assert cells(text, "grass_stream_bf16")[2] == "passed", "a run that chunks nothing says nothing of chunks"

    # A run killed at its timeout after it printed its figures keeps them, and says it timed out.
    hung = "timed out after 150 s"
    results["fsdp_cpu_fp32"] = [{**fsdp, **resumed, "failed_after_measurements": hung}]
    text = report(SMOKE_SHAPE, configurations, results, "python experiments/bench_gpu.py", "not run")
    assert cells(text, "fsdp_cpu_fp32")[2:] == [
        f"failed after printing its figures: {hung}; checkpoint saved at step 8, resumed at step 8, trained to step 12",
        "-",
        *figures,
    ]
    # On the CPU a record has no reserved memory.
    results["grass_stream_bf16"] = [{**passed, "peak_reserved_bytes": None}]
    text = report(SMOKE_SHAPE, configurations, results, "python experiments/bench_gpu.py", "not run")
    assert cells(text, "grass_stream_bf16")[4:6] == ["2.00", "-"]


@pytest.mark.parametrize("shape", [GPU_SHAPE, SMOKE_SHAPE])
def test_the_configurations_no_run_has_measured_come_first(shape):
    configurations = bench_gpu.runs(shape)
    names = [run.name for run in configurations]
    assert (
        names[: len(NEVER_RUN)]
        == list(NEVER_RUN)
        == [
            "grass_chunked_bf16",
            "fsdp_stream_bf16",
            "grass_stream_bf16",
            "grass_stream_sync_bf16",
        ]
    )
    never_run = {run.name: run for run in configurations[: len(NEVER_RUN)]}
    assert never_run["grass_chunked_bf16"].max_resident_bytes is not None, "chunked streaming"
    fsdp = never_run["fsdp_stream_bf16"]
    assert (fsdp.strategy, fsdp.budget_tensors, fsdp.precision) == ("grass_fsdp", 2, "bf16-true"), "fsdp, a budget"
    assert (
        never_run["grass_stream_bf16"].precision == "bf16-true" and never_run["grass_stream_sync_bf16"].overlap is False
    )
    assert len(set(names)) == len(names) == 13
    assert all(run.strategy == "grass_fsdp" for run in configurations[-2:]), "the longest confirming runs last"
    assert bench_gpu.group(configurations, "never_run") == configurations[: len(NEVER_RUN)]
    assert bench_gpu.group(configurations, "confirming") == configurations[len(NEVER_RUN) :]


def test_a_second_group_adds_its_rows_to_the_first_groups_table(tmp_path, monkeypatch):
    out = tmp_path / "gpu"
    configurations = [Run(name, "full") for name in (NEVER_RUN[0], "full_fp32", NEVER_RUN[1])]
    monkeypatch.setattr(bench_gpu, "runs", lambda shape: configurations)
    ran = []

    def fake_measure(shape, runs, accelerator, timeout_s, deadline, on_result):
        results = {run.name: [] for run in runs}
        for run in runs:
            ran.append(run.name)
            results[run.name].append({**STUB, "device": f"cpu for {run.name}"})
            on_result(run, results)
        return results

    monkeypatch.setattr(bench_gpu, "measure", fake_measure)
    assert bench_gpu.main(["--smoke", "--out", str(out), "--group", "never_run", "--machine", "CUDA no"]) == 0
    assert ran == [NEVER_RUN[0], NEVER_RUN[1]]
    first = (out / "results.md").read_text()
    assert cells(first, "full_fp32")[2] == "not run yet" and cells(first, NEVER_RUN[1])[2] == "passed"
    assert "Machine: CUDA no" in first
    assert bench_gpu.main(["--smoke", "--out", str(out), "--group", "confirming", "--resume"]) == 0
    assert ran[2:] == ["full_fp32"]
    both = (out / "results.md").read_text()
    assert all(cells(both, run.name)[2] == "passed" for run in configurations), "the first group's rows are kept"
    assert set(json.loads((out / "records.json").read_text())) == {run.name for run in configurations}
    # Without --resume an invocation starts from no records.
    assert bench_gpu.main(["--smoke", "--out", str(out), "--group", "confirming"]) == 0
    assert cells((out / "results.md").read_text(), NEVER_RUN[0])[2] == "not run yet"
    # A run that kept its figures but then timed out does not pass.
    monkeypatch.setitem(STUB, "failed_after_measurements", "timed out after 150 s")
    assert bench_gpu.main(["--smoke", "--out", str(out), "--group", "confirming"]) == 1
    status = cells((out / "results.md").read_text(), "full_fp32")[2]
    assert status == "failed after printing its figures: timed out after 150 s"
