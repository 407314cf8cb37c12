"""GRASSStrategy on one GPU: peak memory, step time, and what overlapping the transfers buys.

A TinyLlama-shaped Llama (1.1B parameters, random weights) trains a few steps per configuration, each in a
fresh process: full fine-tuning, LISA, and GRASS with optimizer states resident (offload none), in pinned host
memory for the active layers' window (offload cpu), and streamed per tensor under a byte budget with the
transfers overlapped or synchronous; in fp32 and in bf16 on fp32 master weights. It writes
``experiments/results/gpu/results.md`` (or ``--out``).

    python experiments/bench_gpu.py                    # on a GPU machine (experiments/gpu_check.sh runs it)
    python experiments/bench_gpu.py --smoke --out DIR  # the same code path on the CPU, at tiny size
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from offload_runs import ModelShape, Run, measure

RESULTS = Path(__file__).parent / "results" / "gpu"

#: TinyLlama-1.1B's shape (with full multi-head attention), batch 4 x 512 tokens.
GPU_SHAPE = ModelShape(
    layers=22, hidden=2048, intermediate=5632, heads=32, vocab=32000, seq_len=512, batch_size=4, steps=24
)
SMOKE_SHAPE = ModelShape(layers=4, hidden=64, intermediate=176, heads=4, vocab=256, seq_len=32, batch_size=2, steps=8)


def runs(shape: ModelShape) -> list[Run]:
    """The configurations; the budget holds two of the largest block tensors' states and masters."""
    budget = 2 * 12 * shape.hidden * shape.intermediate
    return [
        Run("full_fp32", "full"),
        Run("full_bf16", "full", precision="bf16-true"),
        Run("lisa_bf16", "lisa", offload="cpu", precision="bf16-true"),
        Run("grass_none_bf16", "grass", offload="none", precision="bf16-true"),
        Run("grass_cpu_bf16", "grass", offload="cpu", precision="bf16-true"),
        Run("grass_cpu_fp32", "grass", offload="cpu"),
        Run("grass_stream_bf16", "grass", offload="cpu", max_resident_bytes=budget, precision="bf16-true"),
        Run("grass_stream_sync_bf16", "grass", "cpu", budget, overlap=False, precision="bf16-true"),
    ]


def report(shape: ModelShape, configurations: list[Run], results: dict[str, list[dict]], command: str) -> str:
    """The markdown report of one benchmark."""
    warmup = max(run.probe_steps for run in configurations) + 2
    gib = 2**30
    rows = []
    step = {}
    for run in configurations:
        result = results[run.name][-1]
        step[run.name] = statistics.median(result["step_seconds"][warmup:])
        stats = result["stats"]
        if stats:
            offloaded = (
                f"{stats['peak_resident_bytes'] / gib:.3f} | {stats['bytes_to_device'] / shape.steps / 2**20:.0f} "
                f"| {stats['wait_seconds'] / shape.steps * 1e3:.1f}"
            )
        else:
            offloaded = "- | - | -"
        tokens = shape.batch_size * shape.seq_len / step[run.name]
        rows.append(
            f"| {run.name} | {run.describe()} | {result['peak_memory_bytes'] / gib:.2f} | {step[run.name] * 1e3:.0f} "
            f"| {tokens:,.0f} | {offloaded} |"
        )
    overlap = step["grass_stream_sync_bf16"] / step["grass_stream_bf16"]
    result = results[configurations[0].name][-1]
    return "\n".join(
        [
            "# GRASSStrategy on one GPU",
            "",
            f"Device: {result['device']}. Model: Llama, {shape.layers} layers, hidden {shape.hidden}, "
            f"intermediate {shape.intermediate}, vocab {shape.vocab}, {result['params'] / 1e9:.2f}B parameters, "
            f"random weights; AdamW; batch {shape.batch_size} x {shape.seq_len} tokens; {shape.steps} steps, "
            f"step time the median after the first {warmup}. Each configuration is a fresh process.",
            "",
            "| run | settings | peak memory (GiB) | median step (ms) | tokens/s | offloaded state on the device at "
            "peak (GiB) | MiB fetched per step | ms waited per step |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process's peak RSS on the CPU. The "
            "last three columns exist where GRASSStrategy offloads (offload cpu).",
            "",
            f"Overlapped against synchronous transfers, per-tensor streaming in bf16: {overlap:.3f}x the throughput "
            "(the paper reports 1.08x).",
            "",
            f"Command: `{command}`",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> Path:
    """Run every configuration and write the report; return its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: the code path, not a measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for results.md")
    args = parser.parse_args(argv)
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    configurations = runs(shape)
    results = measure(shape, configurations, accelerator="cpu" if args.smoke else "gpu")
    command = "python experiments/bench_gpu.py" + (" --smoke" if args.smoke else "")
    text = report(shape, configurations, results, command)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.md"
    path.write_text(text)
    print(text)
    return path


if __name__ == "__main__":
    main()
