"""GRASSStrategy and GRASSFSDPStrategy on one GPU: peak memory, step time, and what overlapping the transfers buys.

A TinyLlama-shaped Llama (1.1B parameters, random weights) trains a few steps per configuration, each in a
fresh process with a timeout: full fine-tuning, LISA, and GRASS with optimizer states resident (offload none),
in pinned host memory for the active layers' window (offload cpu), and streamed per tensor under a byte budget
with the transfers overlapped or synchronous; in fp32 and in bf16 on fp32 master weights. One more bf16 GRASS
run offloads the embeddings', head's and final norm's states too (``offload_always_on``) under a budget of
256 MiB, which holds a block's largest tensor but not the embedding or the head: those stream in chunks of rows
(on the smoke model, a budget scaled to do the same). Then LISA under
``grass_fsdp`` on one rank (NCCL), through a sharded checkpoint and a resume: in fp32 with its state shards
resident and in host memory, and in bf16 on fp32 master shards streamed per tensor under the same budget as
GRASS's.

The configurations run in two groups, in this order: first the ones no run has measured anywhere
(``NEVER_RUN``: chunked streaming, ``grass_fsdp`` under a budget, bf16 on masters streamed per tensor and its
synchronous twin, whose step times give the overlap ratio), then the ones that confirm on a GPU what CPU runs
already show, so that a check cut short by its time limit loses the rows it could spare. ``--group`` runs one
group; ``--resume`` adds to the records an earlier invocation left in the same folder (``records.json``), so
that ``experiments/gpu_check.sh`` can run the real-model comparison between the two groups.

It writes ``results.md`` and ``records.json`` (every run's raw record) to ``--out``, created before the first
run and replaced (atomically) after each: a run that fails, or passes its timeout, is a ``failed: ...`` row and
the others still run; a run killed at its timeout, or failing, after it printed its measurements keeps them,
its status saying what happened after. The exit status is 0 only if every configuration this invocation ran passed.

    python experiments/bench_gpu.py --out DIR                    # on a GPU machine (gpu_check.sh runs it)
    python experiments/bench_gpu.py --smoke --out DIR            # the same code path on the CPU, at tiny size
    python experiments/bench_gpu.py --group never_run --out DIR  # one group; then --group confirming --resume
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from offload_runs import DEFAULT_TIMEOUT_S, ModelShape, Run, measure

from lightning_grass.byte_size import format_bytes
from lightning_grass.persistence.atomic_files import write_text_atomically

RESULTS = Path(__file__).parent / "results" / "gpu"

#: TinyLlama-1.1B's shape (with full multi-head attention), batch 4 x 512 tokens.
GPU_SHAPE = ModelShape(
    layers=22, hidden=2048, intermediate=5632, heads=32, vocab=32000, seq_len=512, batch_size=4, steps=24
)
SMOKE_SHAPE = ModelShape(layers=4, hidden=64, intermediate=176, heads=4, vocab=256, seq_len=32, batch_size=2, steps=8)

#: ``grass_chunked_bf16``'s budget per shape: above what a block's largest tensor needs while stepped and below
#: what the embedding and head need, so that those two are stepped in chunks of rows. On GPU_SHAPE (bf16 on fp32
#: masters, CUDA's foreach AdamW) the MLP matrices need 220 MiB and the embedding and head 1.22 GiB; on
#: SMOKE_SHAPE (the CPU's for-loop AdamW) 264 KiB and 384 KiB.
CHUNKED_BUDGET = {GPU_SHAPE: 256 * 2**20, SMOKE_SHAPE: 320 * 2**10}

#: The two runs whose step times give the overlap ratio: (overlapped, synchronous).
OVERLAP_PAIR = ("grass_stream_bf16", "grass_stream_sync_bf16")
#: The two runs whose step times give the cost of skip_non_finite's per-step read: (checked, unchecked).
CHECK_PAIR = ("grass_cpu_bf16", "grass_cpu_bf16_unchecked")
#: The configurations no run has measured anywhere, in the order they run, before every other: streaming in
#: chunks of rows, ``grass_fsdp`` under a budget (bf16 on fp32 master shards), and bf16 on fp32 masters streamed per
#: tensor on a GPU with the transfers overlapped and synchronous (the overlap ratio, which only a GPU gives).
NEVER_RUN = ("grass_chunked_bf16", "fsdp_stream_bf16", *OVERLAP_PAIR)
#: The groups ``--group`` picks, in the order they run: the never-run configurations, then the confirming ones.
GROUPS = ("never_run", "confirming")


def runs(shape: ModelShape = GPU_SHAPE) -> list[Run]:
    """The configurations for ``shape`` (GPU_SHAPE or SMOKE_SHAPE), in the order they run: ``NEVER_RUN`` first.

    A streamed run's budget holds two of the largest block tensors while stepped; ``grass_chunked_bf16``'s is
    ``CHUNKED_BUDGET[shape]``. The confirming configurations follow, the single-device ones (bf16 on masters
    first) before the two ``grass_fsdp`` ones, which take longest.
    """
    stream = dict(sampler="grass", offload="cpu", budget_tensors=2, precision="bf16-true")
    chunked = dict(offload="cpu", offload_always_on=True, max_resident_bytes=CHUNKED_BUDGET[shape])
    fsdp = dict(sampler="lisa", sample_every=2, strategy="grass_fsdp")
    return [
        Run("grass_chunked_bf16", "grass", precision="bf16-true", **chunked),
        Run("fsdp_stream_bf16", offload="cpu", budget_tensors=2, precision="bf16-true", **fsdp),
        Run(OVERLAP_PAIR[0], **stream),
        Run(OVERLAP_PAIR[1], overlap=False, **stream),
        Run(CHECK_PAIR[0], "grass", offload="cpu", precision="bf16-true"),
        Run(CHECK_PAIR[1], "grass", offload="cpu", precision="bf16-true", skip_non_finite=False),
        Run("grass_none_bf16", "grass", offload="none", precision="bf16-true"),
        Run("lisa_bf16", "lisa", offload="cpu", precision="bf16-true"),
        Run("full_bf16", "full", precision="bf16-true"),
        Run("grass_cpu_fp32", "grass", offload="cpu"),
        Run("full_fp32", "full"),
        Run("fsdp_cpu_fp32", offload="cpu", **fsdp),
        Run("fsdp_none_fp32", offload="none", **fsdp),
    ]


def group(configurations: list[Run], name: str) -> list[Run]:
    """The configurations of group ``name`` (one of ``GROUPS``), in their order."""
    never_run = name == GROUPS[0]
    return [run for run in configurations if (run.name in NEVER_RUN) == never_run]


def report(
    shape: ModelShape,
    configurations: list[Run],
    results: dict[str, list[dict[str, Any]]],
    command: str,
    cuda_tests: str,
    machine: str = "not probed by this command",
) -> str:
    """The markdown report of one benchmark, from whichever runs have finished (failed ones included).

    Args:
        shape: The model and batch the runs train.
        configurations: Every configuration, in table order.
        results: The records so far, by run name (see ``offload_runs.measure``); a run without one is pending.
        command: The command line, for the report.
        cuda_tests: The CUDA tests' outcome, for the report.
        machine: What the machine offers (``probe_device.py``'s line), for the report.

    Returns:
        The report.
    """
    warmup = max(run.probe_steps for run in configurations) + 2
    records = {run.name: results[run.name][-1] for run in configurations if results.get(run.name)}
    step = {
        name: statistics.median(record["step_seconds"][warmup:])
        for name, record in records.items()
        if record["failed"] is None
    }
    rows = [_row(shape, run, records.get(run.name), step.get(run.name)) for run in configurations]
    devices = [record["device"] for record in records.values() if record["failed"] is None]
    never_run = ", ".join(f"`{run.name}`" for run in group(configurations, GROUPS[0]))
    return "\n".join(
        [
            "# GRASSStrategy and GRASSFSDPStrategy on one GPU",
            "",
            f"Device: {devices[0] if devices else 'not known yet (no run has passed)'}. Model: Llama, "
            f"{shape.layers} layers, hidden {shape.hidden}, intermediate {shape.intermediate}, vocab {shape.vocab}, "
            f"{shape.parameters() / 1e9:.2f}B parameters, random weights; AdamW; batch {shape.batch_size} x "
            f"{shape.seq_len} tokens; {shape.steps} steps, step time the median after the first {warmup}. Each "
            "configuration is a fresh process with a timeout.",
            "",
            f"Machine: {machine}",
            "",
            f"CUDA tests (`pytest -m cuda tests/strategies tests/offload`): {cuda_tests}.",
            "",
            f"The rows run in table order: first those no run had measured anywhere ({never_run or 'none here'}), "
            "then those that confirm on a GPU what CPU runs already show.",
            "",
            "| run | settings | status | budget | peak allocated (GiB) | peak reserved (GiB) | median step (ms) | "
            "tokens/s | offloaded state on the device at peak (GiB) | MiB fetched per step | ms the host waited per "
            "step | run time (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Peak allocated is `torch.cuda.max_memory_allocated` on a GPU and the process's peak RSS on the CPU; "
            "peak reserved is `torch.cuda.max_memory_reserved`, what the caching allocator held, which is what runs "
            "out (none on the CPU). On a GPU a step's time is read from CUDA events on the compute stream, from the "
            "previous step's end to its own, with no synchronisation between steps, so the transfers a step leaves "
            "on the copy stream overlap the next forward as in training; on the CPU it is the step's wall time. A "
            "budget of N tensors is N times what the largest block tensor needs on the device while it is stepped "
            "(moments, step counter, fp32 master, master gradient, the optimizer's temporaries), computed in the "
            "run's process with `device_bytes_while_stepped`. The offload columns exist where the strategy "
            "offloads; the host's wait leaves out, on CUDA, a fetch's stall on the device. The `fsdp_` runs train "
            f"under `grass_fsdp` on one rank, save a sharded checkpoint at step {shape.steps} and resume from it in "
            "a second Trainer: their peak memory spans the fit, the save and the resume (offload none against cpu "
            "shows whether the state shards stay off the device), and their step and offload figures are the "
            "first fit's, counted on the rank's local shards (on one rank, the whole tensors), as for the other "
            "runs. A run killed at its timeout, or failing, after it printed its figures keeps them, and its status "
            "says what happened after.",
            "",
            "`grass_chunked_bf16` offloads the embeddings', head's and final norm's states too "
            "(`offload_always_on=True`) under a budget that holds a block's largest tensor but not the embedding or "
            "the head while stepped, so those two are fetched, stepped and written back in chunks of rows (its "
            "status says how many): its peak memory is the figure to read, against `grass_stream_bf16`, which "
            "streams the blocks' tensors and keeps the embedding and head resident.",
            "",
            _ratio_line(
                "Overlapped against synchronous transfers, per-tensor streaming in bf16:",
                OVERLAP_PAIR,
                "x the throughput (the paper reports 1.08x).",
                configurations,
                records,
                step,
            ),
            "",
            _ratio_line(
                "Step time with skip_non_finite's per-step read against without it (bf16, offload cpu):",
                CHECK_PAIR,
                "x.",
                configurations,
                records,
                step,
            ),
            "",
            f"Command: `{command}`",
            "",
        ]
    )


def _row(shape: ModelShape, run: Run, record: dict[str, Any] | None, step: float | None) -> str:
    if record is None:
        return f"| {run.name} | {run.describe()} | not run yet |" + " - |" * 9
    wall = f"{record['wall_seconds']:.0f}"
    if record["failed"] is not None:
        failed = record["failed"].replace("|", "\\|")
        return f"| {run.name} | {run.describe()} | failed: {failed} |" + " - |" * 8 + f" {wall} |"
    after = record.get("failed_after_measurements")
    status = "passed" if after is None else f"failed after printing its figures: {after}".replace("|", "\\|")
    if run.strategy == "grass_fsdp":
        status += (
            f"; checkpoint saved at step {record['saved_at_step']}, resumed at step {record['resumed_at_step']}, "
            f"trained to step {record['final_step']}"
        )
    if record.get("chunked_tensors"):
        status += (
            f"; {record['chunked_tensors']} tensors stepped in chunks of rows, the largest "
            f"({format_bytes(record['largest_tensor_bytes'])} while stepped) in {record['largest_tensor_chunks']}"
        )
    budget = "-" if record["max_resident_bytes"] is None else format_bytes(record["max_resident_bytes"])
    stats = record["stats"]
    offloaded = [
        _stat(stats, "peak_resident_bytes", 2**30, ".3f"),
        _stat(stats, "bytes_to_device", shape.steps * 2**20, ".0f"),
        _stat(stats, "host_wait_seconds", shape.steps / 1e3, ".1f"),
    ]
    tokens = shape.batch_size * shape.seq_len / step
    reserved = record.get("peak_reserved_bytes")
    figures = [
        f"{record['peak_memory_bytes'] / 2**30:.2f}",
        "-" if reserved is None else f"{reserved / 2**30:.2f}",
        f"{step * 1e3:.0f}",
        f"{tokens:,.0f}",
        *offloaded,
    ]
    return f"| {run.name} | {run.describe()} | {status} | {budget} | {' | '.join(figures)} | {wall} |"


def _stat(stats: dict[str, float], key: str, divisor: float, spec: str) -> str:
    return format(stats[key] / divisor, spec) if key in stats else "-"


def _ratio_line(
    head: str,
    pair: tuple[str, str],
    unit: str,
    configurations: list[Run],
    records: dict[str, dict[str, Any]],
    step: dict[str, float],
) -> str:
    """``head``, then the median step time of ``pair[1]`` over that of ``pair[0]``, or why it was not measured."""
    base, other = pair
    if base in step and other in step:
        return f"{head} {step[other] / step[base]:.3f}{unit}"
    configured = {run.name for run in configurations}
    reasons = []
    for name in pair:
        if name not in configured:
            reasons.append(f"{name} is not configured")
        elif name not in records:
            reasons.append(f"{name} has not run yet")
        elif name not in step:
            reasons.append(f"{name} failed")
    return f"{head} not measured: {' and '.join(reasons)}."


def main(argv: list[str] | None = None) -> int:
    """Run the configurations, rewriting the report after each; return 0 if every one it ran passed, else 1."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: the code path, not a measurement")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for results.md and records.json (created first)"
    )
    parser.add_argument(
        "--group", choices=GROUPS, default=None, help="run only this group of configurations (default: every one)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="start from the records in OUT/records.json, which an earlier invocation wrote, instead of none",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds one configuration may run (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds for every configuration together; none by default"
    )
    parser.add_argument("--cuda-tests", default="not run by this command", help="the CUDA tests' outcome, reported")
    parser.add_argument(
        "--machine", default="not probed by this command", help="what the machine offers (probe_device.py's line)"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = None if args.time_limit is None else start + args.time_limit
    args.out.mkdir(parents=True, exist_ok=True)
    path, records_path = args.out / "results.md", args.out / "records.json"
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    configurations = runs(shape)
    selected = configurations if args.group is None else group(configurations, args.group)
    earlier: dict[str, list[dict[str, Any]]] = {}
    if args.resume and records_path.exists():
        earlier = json.loads(records_path.read_text())
    command = "python experiments/bench_gpu.py" + (" --smoke" if args.smoke else "")

    def write(results: dict[str, list[dict[str, Any]]]) -> None:
        merged = {**earlier, **{name: records for name, records in results.items() if records}}
        write_text_atomically(records_path, json.dumps(merged, indent=1) + "\n")
        write_text_atomically(path, report(shape, configurations, merged, command, args.cuda_tests, args.machine))

    def on_result(run: Run, results: dict[str, list[dict[str, Any]]]) -> None:
        record = results[run.name][-1]
        outcome = "passed" if record["failed"] is None else f"failed: {record['failed']}"
        if record.get("failed_after_measurements"):
            outcome = f"kept its figures, then failed: {record['failed_after_measurements']}"
        print(f"time: {run.name} {record['wall_seconds']:.0f} s, {outcome}", flush=True)
        write(results)

    write({})
    accelerator = "cpu" if args.smoke else "gpu"
    results = measure(shape, selected, accelerator, timeout_s=args.timeout, deadline=deadline, on_result=on_result)
    print(path.read_text())
    part = "benchmark" if args.group is None else f"benchmark ({args.group.replace('_', '-')} rows)"
    print(f"time: {part} {time.monotonic() - start:.0f} s", flush=True)
    passed = all(
        records[-1]["failed"] is None and "failed_after_measurements" not in records[-1] for records in results.values()
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
