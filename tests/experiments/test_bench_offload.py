"""bench_offload.py writes its table as runs end: a benchmark stopped after one run leaves that row and the rest."""

import dataclasses

import bench_offload
import pytest
from bench_gpu import SMOKE_SHAPE

from lightning_grass.byte_size import format_bytes


class StoppedError(Exception):
    """Raised after the first run, as a benchmark killed midway."""


def cells(text, name):
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split(" | ")]


def test_a_benchmark_stopped_after_its_first_run_leaves_that_row_and_the_others_not_run_yet(tmp_path, monkeypatch):
    configured = {run.name: run for run in bench_offload.runs()}
    order = ["disk_chunked", "none", "disk_chunked_bf16"]
    monkeypatch.setattr(bench_offload, "runs", lambda: [configured[name] for name in order])
    output = tmp_path / "offload_cpu.md"
    written = []
    measure = bench_offload.measure

    def stopped_after_the_first_run(*args, on_result, **kwargs):
        written.append(output.read_text())

        def record_then_stop(run, results):
            on_result(run, results)
            raise StoppedError

        return measure(*args, on_result=record_then_stop, **kwargs)

    monkeypatch.setattr(bench_offload, "measure", stopped_after_the_first_run)
    shape = dataclasses.replace(SMOKE_SHAPE, layers=2, steps=2)
    assert shape.intermediate == shape.hidden * 11 // 4, "the benchmark's own proportion"
    flags = [f"--layers={shape.layers}", f"--hidden={shape.hidden}", f"--heads={shape.heads}"]
    flags += [f"--vocab={shape.vocab}", f"--seq-len={shape.seq_len}", f"--steps={shape.steps}"]
    with pytest.raises(StoppedError):
        bench_offload.main([*flags, "--warmup=0", "--repeats=1", "--output", str(output)])

    (before,) = written
    assert [cells(before, name)[2] for name in order] == ["not run yet"] * 3, "the table exists before any run"
    text = output.read_text()
    assert [cells(text, name)[2] for name in order[1:]] == ["not run yet"] * 2
    chunked = cells(text, "disk_chunked")
    assert chunked[1] == (
        "lisa, n_active=2; offload=disk; offload_always_on=True; budget 2 of 4 chunks of rows of the largest tensor "
        "while stepped; overlap=True; 32-true"
    )
    assert chunked[2] == "passed"
    assert float(chunked[3]) > 0 and float(chunked[5]) > 0
    assert chunked[4] == chunked[6] == "-", "no ratio without the no-offload run of the same precision"
    # The largest tensor is the embedding (or head), 256 x 64 in fp32: AdamW's two moments and its for-loop's two
    # temporaries (16 bytes an element) and a step counter. One chunk, 64 of its rows, takes half the budget.
    largest = 256 * 64 * 16 + 4
    budget = 2 * (64 * 64 * 16 + 4)
    assert chunked[10:] == [format_bytes(budget), f"{format_bytes(largest)} in 4 chunks"]
    assert float(chunked[9]) * 2**20 <= budget, "the states in RAM stayed within the budget"
    assert f"disk_chunked: {budget} bytes ({format_bytes(budget)}), 0.500 of the largest tensor's {largest}" in text
