"""Peak memory and step time of GRASSStrategy's offload on the CPU: the disk tier, a byte budget, bf16 masters.

A Llama-style model whose AdamW state is over 1 GB trains with GRASSCallback (LISA sampling, a new pair of
layers every step, so every layer soon has optimizer state, and states move at every step) under:

- ``offload="none"``: every layer's state stays in RAM (the reference);
- ``offload="disk"``: only the active layers' states are in RAM;
- ``offload="disk"`` with ``max_resident_bytes``: the active layers' states stream through RAM one tensor at
  a time, within the budget;
- the same in ``bf16-true``, on fp32 master weights that are offloaded with the states.

Each run is a fresh process, so its peak RSS (``ru_maxrss``) is its own; runs alternate in ABBA order so that
machine drift hits all alike.

    python experiments/bench_offload.py        # writes experiments/results/offload_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

from offload_runs import ModelShape, Run, measure

RESULTS = Path(__file__).parent / "results" / "offload_cpu.md"


def main() -> None:
    """Run every configuration and write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4, help="steps dropped from the step-time median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    shape = ModelShape(
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.hidden * 11 // 4,
        heads=16,
        vocab=args.vocab,
        seq_len=args.seq_len,
        batch_size=1,
        steps=args.steps,
    )
    # The budget holds two of the largest block tensors while stepped: states, masters and the step's workspace.
    lisa = dict(sampler="lisa", sample_every=1)
    runs = [
        Run("none", offload="none", **lisa),
        Run("disk", offload="disk", **lisa),
        Run("disk_budget", offload="disk", budget_tensors=2, **lisa),
        Run("none_bf16", offload="none", precision="bf16-true", **lisa),
        Run("disk_budget_bf16", offload="disk", budget_tensors=2, precision="bf16-true", **lisa),
    ]
    results = measure(shape, runs, accelerator="cpu", repeats=args.repeats, timeout_s=args.timeout)

    gib = 2**30
    passed = {r.name: [x for x in results[r.name] if x["failed"] is None] for r in runs}
    peak = {name: statistics.median(x["peak_memory_bytes"] for x in xs) for name, xs in passed.items() if xs}
    step = {
        name: statistics.median(s for x in xs for s in x["step_seconds"][args.warmup :])
        for name, xs in passed.items()
        if xs
    }
    params = shape.parameters()
    rows = []
    for run in runs:
        if run.name not in peak:
            failed = results[run.name][-1]["failed"].replace("|", "\\|")
            rows.append(f"| {run.name} | {run.describe()} | failed: {failed} | - | - | - | - | - |")
            continue
        reference = "none_bf16" if run.precision == "bf16-true" else "none"
        peak_ratio = f"{peak[run.name] / peak[reference]:.3f}" if reference in peak else "-"
        step_ratio = f"{step[run.name] / step[reference]:.3f}" if reference in step else "-"
        stats = passed[run.name][-1]["stats"]
        mib = args.steps * 2**20
        moved = "- | -"
        if stats:
            read, written = stats["bytes_to_device"] / mib, stats["bytes_to_backing"] / mib
            moved = f"{read:.0f} / {written:.0f} | {stats['host_wait_seconds'] / args.steps * 1e3:.0f}"
        rows.append(
            f"| {run.name} | {run.describe()} | {peak[run.name] / gib:.2f} | {peak_ratio} "
            f"| {step[run.name]:.3f} | {step_ratio} | {moved} |"
        )
    flags = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "output")
    lines = [
        "# GRASSStrategy offload on the CPU: the disk tier, a byte budget, bf16 masters",
        "",
        f"Model: Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {params / 1e6:.0f}M "
        f"parameters; AdamW state {8 * params / gib:.2f} GiB in fp32 once every parameter has one (with bf16 "
        f"weights, {12 * params / gib:.2f} GiB of fp32 moments and masters). Batch 1 x {args.seq_len} tokens.",
        "GRASSCallback(mode='lisa', n_active=2, sample_every=1): a new pair of layers at every step. The "
        "embeddings, head and final norm stay resident.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU. {args.repeats} runs per configuration, each a "
        f"fresh process, ABBA order; step time is the median over steps {args.warmup + 1} to {args.steps} of all "
        "runs. Ratios are to `none` in the same precision, measured in the same invocation. A run that failed "
        "every time is a `failed: ...` row (its last error line).",
        "",
        "| run | settings | peak RSS (GiB) | RSS ratio | median step (s) | step-time ratio | MiB read / written "
        "per step | ms the host waited per step |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Command: `python experiments/bench_offload.py {flags}`",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


if __name__ == "__main__":
    main()
