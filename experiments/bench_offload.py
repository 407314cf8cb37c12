"""Peak memory and step time of GRASSStrategy's offload on the CPU: the disk tier, byte budgets, chunks, bf16 masters.

A Llama-style model (56M parameters by default, AdamW state 0.42 GiB in fp32 and 0.63 GiB of fp32 moments and
masters in bf16) trains with GRASSCallback (LISA sampling, a new pair of layers every step, so every layer soon
has optimizer state, and states move at every step) under:

- ``offload="none"``: every layer's state stays in RAM (the reference, in fp32 and in bf16);
- ``offload="disk"``: only the active layers' states are in RAM;
- ``offload="disk"`` with ``max_resident_bytes`` of two block tensors: the active layers' states stream
  through RAM one tensor at a time, within the budget;
- ``offload="disk"`` with ``offload_always_on=True`` and a budget below the largest tensor (the embedding and
  LM head): those stream too, in chunks of rows, each at most half the budget;
- the budgeted runs again in ``bf16-true``, on fp32 master weights that are offloaded with the states.

Each run is a fresh process, so its peak RSS (``ru_maxrss``) is its own; runs alternate in ABBA order so that
machine drift hits all alike. The report is written before the first run and replaced (atomically) after
each, so a benchmark stopped midway leaves every finished row; a run that failed is a ``failed: ...`` row.
The default size fits the whole benchmark in about 12 minutes on 2 cores: on a CPU without bf16 matrix
instructions (AVX2), torch's bf16 matmuls in the backward pass are tens of times slower than fp32's, and the
six bf16 runs take most of that time.

    python experiments/bench_offload.py        # writes experiments/results/offload_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from offload_runs import ModelShape, Run, measure

from lightning_grass.byte_size import format_bytes
from lightning_grass.persistence.atomic_files import write_text_atomically

RESULTS = Path(__file__).parent / "results" / "offload_cpu.md"

#: Chunks of rows the chunked runs cut the largest tensor (the embedding, and the LM head) into.
CHUNKS = 4


def runs() -> list[Run]:
    """The configurations, in table order (and the first repeat's order)."""
    lisa = dict(sampler="lisa", sample_every=1)
    chunked = dict(offload="disk", offload_always_on=True, budget_chunks=CHUNKS, **lisa)
    return [
        Run("none", offload="none", **lisa),
        Run("disk", offload="disk", **lisa),
        Run("disk_budget", offload="disk", budget_tensors=2, **lisa),
        Run("disk_chunked", **chunked),
        Run("none_bf16", offload="none", precision="bf16-true", **lisa),
        Run("disk_budget_bf16", offload="disk", budget_tensors=2, precision="bf16-true", **lisa),
        Run("disk_chunked_bf16", precision="bf16-true", **chunked),
    ]


def report(
    shape: ModelShape,
    configurations: list[Run],
    results: dict[str, list[dict[str, Any]]],
    repeats: int,
    warmup: int,
    command: str,
    machine: str,
) -> str:
    """The markdown report, from whichever runs have finished (failed ones included).

    Args:
        shape: The model and batch the runs train.
        configurations: Every configuration, in table order.
        results: The records so far, by run name (see ``offload_runs.measure``); a run without one is pending.
        repeats: Runs per configuration the benchmark makes.
        warmup: Leading steps of each run left out of its step times.
        command: The command line, for the report.
        machine: The machine and its load, for the report.

    Returns:
        The report.
    """
    passed = {
        run.name: [record for record in results.get(run.name, []) if record["failed"] is None] for run in configurations
    }
    step = {
        name: statistics.median(s for record in records for s in record["step_seconds"][warmup:])
        for name, records in passed.items()
        if records
    }
    peak = {
        name: statistics.median(r["peak_memory_bytes"] for r in records) for name, records in passed.items() if records
    }
    rows = []
    for run in configurations:
        reference = "none_bf16" if run.precision == "bf16-true" else "none"
        ratios = (peak.get(run.name), peak.get(reference), step.get(run.name), step.get(reference))
        rows.append(_row(shape, run, results.get(run.name, []), passed[run.name], repeats, ratios))
    gib = 2**30
    params = shape.parameters()
    return "\n".join(
        [
            "# GRASSStrategy offload on the CPU: the disk tier, byte budgets, chunks of rows, bf16 masters",
            "",
            f"Model: Llama, {shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, vocab "
            f"{shape.vocab}, {params / 1e6:.0f}M parameters; AdamW state {8 * params / gib:.2f} GiB in fp32 once "
            f"every parameter has one (with bf16 weights, {12 * params / gib:.2f} GiB of fp32 moments and "
            f"masters). Batch {shape.batch_size} x {shape.seq_len} tokens, {shape.steps} steps.",
            "GRASSCallback(mode='lisa', n_active=2, sample_every=1): a new pair of layers at every step. The "
            "embeddings, head and final norm stay resident, except in the `_chunked` runs (`offload_always_on=True`).",
            f"Machine: {machine}. {repeats} run{'' if repeats == 1 else 's'} per configuration, each a fresh "
            "process, ABBA order; step time is "
            f"the median over steps {warmup + 1} to {shape.steps} of all its runs. Ratios are to `none` in the same "
            "precision, measured in the same invocation. The report is rewritten after every run: a configuration "
            "not run yet says so, and one that failed says `failed:` and its last error line.",
            "",
            "| run | settings | status | peak RSS (GiB) | RSS ratio | median step (s) | step-time ratio | ms the host "
            "waited per step | MiB to RAM / to disk per step | peak resident states (MiB) | budget | largest "
            "offloaded tensor while stepped |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            _budget_line(configurations, passed),
            "",
            _precision_line(step),
            "",
            "Peak RSS is the run's process's `ru_maxrss` (the median over its runs). The offload columns are the "
            "strategy's `offload_stats` at the end of a run, per step: `host_wait_seconds` (the waits for the disk "
            "tier's reads and writes; the median over its runs), and, of its last passed run, `bytes_to_device` and "
            "`bytes_to_backing` (RAM is the device here) and "
            "`peak_resident_bytes` (the most optimizer state, masters included, in RAM at once; without offload, "
            "every state). The last column is what the largest tensor the run offloads needs while stepped, and "
            "how many chunks of rows the strategy steps it in under the budget.",
            "",
            f"Command: `{command}`",
            "",
        ]
    )


def _row(
    shape: ModelShape,
    run: Run,
    records: list[dict[str, Any]],
    passed: list[dict[str, Any]],
    repeats: int,
    ratios: tuple[float | None, float | None, float | None, float | None],
) -> str:
    head = f"| {run.name} | {run.describe()} |"
    if not records:
        return f"{head} not run yet |" + " - |" * 9
    failures = [record["failed"].replace("|", "\\|") for record in records if record["failed"] is not None]
    if not passed:
        return f"{head} failed: {failures[-1]} |" + " - |" * 9
    status = "passed" if len(passed) == repeats else f"passed {len(passed)} of {repeats}"
    if failures:
        status += f"; failed: {failures[-1]}"
    elif len(passed) < repeats:
        status += " so far"
    peak, peak_reference, step, step_reference = ratios
    last = passed[-1]
    stats = last["stats"]
    mib = 2**20
    wait = [record["stats"]["host_wait_seconds"] for record in passed if "host_wait_seconds" in record["stats"]]
    moved = "-"
    if "bytes_to_device" in stats:
        moved = (
            f"{stats['bytes_to_device'] / shape.steps / mib:.0f} / {stats['bytes_to_backing'] / shape.steps / mib:.0f}"
        )
    budget = "none" if last["max_resident_bytes"] is None else format_bytes(last["max_resident_bytes"])
    largest = "-"
    if run.offload != "none":
        chunks = last["largest_tensor_chunks"]
        largest = format_bytes(last["largest_tensor_bytes"]) + (f" in {chunks} chunks" if chunks > 1 else ", whole")
    figures = [
        status,
        f"{peak / 2**30:.2f}",
        "-" if peak_reference is None else f"{peak / peak_reference:.3f}",
        f"{step:.3f}",
        "-" if step_reference is None else f"{step / step_reference:.3f}",
        f"{statistics.median(wait) / shape.steps * 1e3:.0f}" if wait else "-",
        moved,
        f"{stats['peak_resident_bytes'] / mib:.1f}" if "peak_resident_bytes" in stats else "-",
        budget,
        largest,
    ]
    return f"{head} {' | '.join(figures)} |"


def _budget_line(configurations: list[Run], passed: dict[str, list[dict[str, Any]]]) -> str:
    """How the chunked runs' budget was chosen, with its bytes where a chunked run has passed."""
    chosen = (
        f"The `_chunked` runs' budget is twice what one of {CHUNKS} chunks of rows of the largest offloaded tensor "
        "(the embedding, and the LM head of the same shape) needs while stepped (its AdamW moments, step counter "
        "and the step's temporaries; with bf16 weights also its fp32 master and master gradient), computed in the "
        "run's process: about half of that tensor, so that the strategy, whose chunks take at most half the "
        f"budget (one is stepped while the next is fetched), cuts it into {CHUNKS} chunks."
    )
    measured = []
    for run in configurations:
        if run.budget_chunks is None or not passed[run.name]:
            continue
        record = passed[run.name][-1]
        budget, largest = record["max_resident_bytes"], record["largest_tensor_bytes"]
        measured.append(
            f"{run.name}: {budget} bytes ({format_bytes(budget)}), {budget / largest:.3f} of the largest tensor's "
            f"{largest} bytes ({format_bytes(largest)}), which is stepped in {record['largest_tensor_chunks']} "
            f"chunks; {record['chunked_tensors']} tensors were too large for the budget and chunked"
        )
    return chosen + (" " + "; ".join(measured) + "." if measured else "")


def _precision_line(step: dict[str, float]) -> str:
    """bf16-true's step time against fp32's without offload, which says how much compute hides the transfers."""
    head = "Without offload, a bf16-true step against an fp32 one on this machine:"
    if "none" in step and "none_bf16" in step:
        return (
            f"{head} {step['none_bf16'] / step['none']:.1f}x the time (a CPU without bf16 matrix instructions runs "
            "torch's bf16 matmuls far slower than fp32's), so the same transfers weigh less against a bf16 step."
        )
    return f"{head} not measured yet."


def _machine(start: float) -> str:
    """The machine, its load average and the benchmark's wall time so far, as the report is written."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, CPU; when this was written, the benchmark had run "
        f"{time.monotonic() - start:.0f} s and the load average (1, 5, 15 min) was {load}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, rewriting the report after each; return 0 if every run passed, else 1."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped from the step-time median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    start = time.monotonic()
    shape = ModelShape(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.hidden * 11 // 4,
        heads=args.heads,
        vocab=args.vocab,
        seq_len=args.seq_len,
        batch_size=1,
        steps=args.steps,
    )
    configurations = runs()
    flags = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "output")
    command = f"python experiments/bench_offload.py {flags}"

    def write(results: dict[str, list[dict[str, Any]]]) -> None:
        text = report(shape, configurations, results, args.repeats, args.warmup, command, _machine(start))
        write_text_atomically(args.output, text)

    def on_result(run: Run, results: dict[str, list[dict[str, Any]]]) -> None:
        record = results[run.name][-1]
        outcome = "passed" if record["failed"] is None else f"failed: {record['failed']}"
        print(f"time: {run.name} {record['wall_seconds']:.0f} s, {outcome}", flush=True)
        write(results)

    write({})
    results = measure(shape, configurations, "cpu", repeats=args.repeats, timeout_s=args.timeout, on_result=on_result)
    print(args.output.read_text())
    print(f"time: benchmark {time.monotonic() - start:.0f} s", flush=True)
    return 0 if all(record["failed"] is None for records in results.values() for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
