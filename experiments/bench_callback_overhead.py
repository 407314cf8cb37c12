"""Step time of GRASSCallback: what MGN bookkeeping costs next to LISA and next to static GRASS.

Four configurations of the same Llama-style model train on the same batches with the same n_active:

- ``lisa``: uniform sampling, no MGN.
- ``grass``: adaptive GRASS with its defaults (MGN every step, refresh every window).
- ``grass_static``: GRASS*, probing only; no MGN after probing.
- ``grass_no_refresh``: adaptive GRASS with ``update_every`` past the end of the run. It measures MGN every
  step but never refreshes, so it draws exactly the same layers as ``grass_static``: the pair isolates the
  per-step measurement from the effect of which layers are drawn.

``grass`` against ``lisa`` is the headline ratio, but the two draw different layers, and a step's backward
pass reaches down to its lowest active layer, so that ratio also carries a difference in backward depth
(reported). Runs alternate in ABBA order, each run's median is reported so the spread between runs of one
configuration is visible, process CPU time is reported beside wall time, and Lightning's SimpleProfiler
gives the time spent inside GRASSCallback's per-step hooks: the bookkeeping cost alone.

    python experiments/bench_callback_overhead.py            # writes experiments/results/callback_overhead.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_grass import GRASSCallback

RESULTS = Path(__file__).parent / "results" / "callback_overhead.md"
PER_STEP_HOOKS = (".on_train_batch_start", ".on_before_optimizer_step", ".on_train_batch_end")
CONFIGURATIONS = {
    "lisa": dict(mode="lisa"),
    "grass": dict(mode="grass"),
    "grass_static": dict(mode="grass_static"),
    "grass_no_refresh": dict(mode="grass", update_every=10**9),
}


class CausalLM(pl.LightningModule):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4, weight_decay=0.01)


class StepTimer(Callback):
    """Wall and process CPU time of each training batch, and how many layers its backward pass crosses."""

    def __init__(self, grass: GRASSCallback, num_layers: int) -> None:
        self.grass, self.num_layers = grass, num_layers
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.depth: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self.depth.append(self.num_layers - min(self.grass.active_layers))
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, *args) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)


@dataclass
class Measurements:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    run_medians: list[float] = field(default_factory=list)
    hook_seconds: float = 0.0
    probe_wall: list[float] = field(default_factory=list)
    first_draws: list[list[int]] = field(default_factory=list)


def run(name: str, args: argparse.Namespace, config: LlamaConfig, loader: DataLoader, out: Measurements) -> None:
    """One fit of configuration ``name``; appends its timed steps (after probing and warm-up) to ``out``."""
    callback = GRASSCallback(
        n_active=args.n_active,
        probe_steps=args.probe_steps,
        sample_every=args.sample_every,
        seed=0,
        skip_non_finite=False,  # measure MGN alone; the non-finite check costs every mode the same host read
        **CONFIGURATIONS[name],
    )
    timer = StepTimer(callback, config.num_hidden_layers)
    profiler = SimpleProfiler(dirpath=tempfile.mkdtemp(), filename="profile")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.probe_steps + args.steps,
        callbacks=[callback, timer],
        profiler=profiler,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CausalLM(config), loader)
    probing = args.probe_steps if callback.config.probes else 0
    skip = probing + args.warmup
    out.wall += timer.wall[skip:]
    out.cpu += timer.cpu[skip:]
    out.depth += timer.depth[skip:]
    out.run_medians.append(statistics.median(timer.wall[skip:]))
    out.probe_wall += timer.wall[1:probing]
    out.first_draws.append(callback.history[0]["active_layers"])
    out.hook_seconds += sum(
        sum(durations[skip:])
        for hook, durations in profiler.recorded_durations.items()
        if hook.startswith("[Callback]GRASSCallback") and hook.endswith(PER_STEP_HOOKS)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-active", type=int, default=2)
    parser.add_argument("--probe-steps", type=int, default=5)
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="training steps after probing")
    parser.add_argument("--warmup", type=int, default=5, help="training steps dropped from each run")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    config = LlamaConfig(
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=2048,
        max_position_embeddings=args.seq_len,
    )
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (64 * args.batch_size, args.seq_len), generator=generator)
    loader = DataLoader(TensorDataset(tokens), batch_size=args.batch_size)
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())

    names = list(CONFIGURATIONS)
    results = {name: Measurements() for name in names}
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            run(name, args, config, loader, results[name])

    wall = {n: statistics.median(results[n].wall) for n in names}
    cpu = {n: statistics.median(results[n].cpu) for n in names}
    hooks = {n: results[n].hook_seconds / len(results[n].wall) for n in names}
    assert results["grass_no_refresh"].first_draws == results["grass_static"].first_draws

    def row(name: str, baseline: str) -> str:
        m = results[name]
        return (
            f"| {name} | {wall[name] * 1e3:.1f} | {wall[name] / wall[baseline]:.3f} "
            f"| {', '.join(f'{r * 1e3:.1f}' for r in m.run_medians)} | {cpu[name] * 1e3:.1f} "
            f"| {cpu[name] / cpu[baseline]:.3f} | {statistics.mean(m.depth):.2f} | {hooks[name] * 1e3:.2f} "
            f"| {hooks[name] / wall[name]:.2%} |"
        )

    header = [
        "| configuration | median wall step (ms) | wall ratio | per-run wall medians (ms) | median CPU step (ms) "
        "| CPU ratio | mean backward depth (layers) | GRASSCallback hooks per step (ms) | hooks / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    probe = statistics.median(results["grass"].probe_wall)
    command = "python experiments/bench_callback_overhead.py " + " ".join(
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "output"
    )
    lines = [
        "# GRASSCallback step-time overhead",
        "",
        f"Model: Llama, {args.layers} layers, hidden {args.hidden}, {params / 1e6:.1f}M parameters; batch "
        f"{args.batch_size} x {args.seq_len} tokens; n_active={args.n_active}, probe_steps={args.probe_steps}, "
        f"sample_every={args.sample_every}.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU.",
        f"{args.repeats} runs per configuration in ABBA order, {args.steps - args.warmup} timed steps per run.",
        "",
        "## grass against lisa (ratios to lisa)",
        "",
        *header,
        row("lisa", "lisa"),
        row("grass", "lisa"),
        "",
        "## Per-step MGN alone: same layers drawn (ratios to grass_static)",
        "",
        *header,
        row("grass_static", "grass_static"),
        row("grass_no_refresh", "grass_static"),
        "",
        f"Probing step (full backward through all {args.layers} layers, MGN in gradient hooks): "
        f"{probe * 1e3:.1f} ms median, {probe / wall['lisa']:.3f}x a lisa training step.",
        "",
        f"Command: `{command}`",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


if __name__ == "__main__":
    main()
