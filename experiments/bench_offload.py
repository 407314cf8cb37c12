"""Peak memory and step time of GRASSStrategy's disk tier against no offload, on the CPU.

A Llama-style model whose AdamW state is over 1 GB trains with GRASSCallback (LISA sampling, a new pair
of layers every step, so every layer soon has optimizer state) under ``GRASSStrategy(offload="none")``,
which keeps every layer's state in RAM, and ``GRASSStrategy(offload="disk")``, which keeps only the
layers being updated (at most ``max_resident_layers``) in RAM. Each run is a fresh subprocess, so its peak
RSS (``ru_maxrss``) is its own; runs alternate in ABBA order so machine drift hits both alike.

    python experiments/bench_offload.py        # writes experiments/results/offload_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "offload_cpu.md"
CONFIGURATIONS = ("none", "disk")


def worker(args: argparse.Namespace) -> None:
    """Train one configuration and print its measurements as JSON on the last line of stdout."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_grass import GRASSCallback, GRASSStrategy

    class CausalLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = LlamaForCausalLM(config)

        def training_step(self, batch, batch_idx):
            (input_ids,) = batch
            return self.model(input_ids=input_ids, labels=input_ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-5, weight_decay=0.01)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    config = LlamaConfig(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
    )
    tokens = torch.randint(0, config.vocab_size, (args.steps, args.seq_len), generator=torch.Generator().manual_seed(0))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as offload_dir:
        strategy = GRASSStrategy(offload=args.worker, offload_dir=offload_dir, max_resident_layers=args.max_resident)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            strategy=strategy,
            callbacks=[GRASSCallback(mode="lisa", n_active=args.n_active, sample_every=1, seed=0), timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = CausalLM()
        params = sum(p.numel() for p in module.parameters())
        trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=1))
    result = {
        "params": params,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_seconds": timer.seconds,
        "stats": trainer.strategy.offload_stats,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-active", type=int, default=2)
    parser.add_argument("--max-resident", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4, help="steps dropped from the step-time median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("output", "worker")]
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGURATIONS}
    for repeat in range(args.repeats):
        for name in CONFIGURATIONS if repeat % 2 == 0 else CONFIGURATIONS[::-1]:
            command = [sys.executable, __file__, *flags, f"--worker={name}"]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(output.strip().splitlines()[-1]))

    params = runs["none"][0]["params"]
    peak = {n: statistics.median(r["peak_rss_bytes"] for r in runs[n]) for n in CONFIGURATIONS}
    step = {n: statistics.median(s for r in runs[n] for s in r["step_seconds"][args.warmup :]) for n in CONFIGURATIONS}
    disk = runs["disk"][-1]["stats"]
    timed_steps = args.steps
    gib = 1024**3
    state_bytes = 2 * 4 * params
    lines = [
        "# GRASSStrategy disk tier against no offload (CPU)",
        "",
        f"Model: Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {params / 1e6:.0f}M "
        f"parameters, fp32; AdamW state {state_bytes / gib:.2f} GiB if every parameter has one. "
        f"Batch 1 x {args.seq_len} tokens.",
        f"GRASSCallback(mode='lisa', n_active={args.n_active}, sample_every=1): a new pair of layers every step. "
        f"max_resident_layers={args.max_resident}; embeddings, head and final norm stay resident.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU. {args.repeats} runs per "
        f"configuration, each a fresh process, ABBA order; step time is the median over steps {args.warmup + 1} "
        f"to {args.steps} of all runs.",
        "",
        "| offload | peak RSS (GiB) | RSS ratio | median step (s) | step-time ratio |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {peak[n] / gib:.2f} | {peak[n] / peak['none']:.3f} | {step[n]:.3f} "
            f"| {step[n] / step['none']:.3f} |"
            for n in CONFIGURATIONS
        ),
        "",
        f"Peak RSS saved by the disk tier: {(peak['none'] - peak['disk']) / gib:.2f} GiB. Disk tier, last run: "
        f"{disk['backing_bytes'] / gib:.2f} GiB of layer state in files, at most {disk['peak_resident_layers']} layers "
        f"resident, {disk['bytes_to_device'] / timed_steps / 2**20:.0f} MiB read and "
        f"{disk['bytes_to_backing'] / timed_steps / 2**20:.0f} MiB written per step, "
        f"{disk['wait_seconds'] / timed_steps * 1e3:.0f} ms per step spent waiting on I/O.",
        "",
        f"Command: `python experiments/bench_offload.py {' '.join(flags)}`",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


if __name__ == "__main__":
    main()
