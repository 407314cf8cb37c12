"""Step time and device state of module-wise against layer-wise GRASS, side by side on one model.

Both train the same model on the same batches with ``GRASSStrategy(offload="cpu")`` and ``n_active`` layers'
worth of parameters: ``unit="layer"`` draws ``n_active`` layers, ``unit="module"`` draws attention and MLP matrices
up to the same parameter count. Runs alternate in ABAB order and each run's median step is reported, so the spread
between runs of one unit is visible beside the gap between units. Per run:

- the median step (wall) after probing, and the process CPU time per step;
- the optimizer state and fp32 masters on the device at peak (the strategy's ``peak_resident_bytes``), and the
  gradient bytes held at the optimizer step (the largest over the steps);
- the trainable parameters per step, and how deep the backward reaches: the mean over windows of the lowest
  active layer. With ``train_embeddings=True`` (the default) the backward reaches the embeddings at every step
  whatever is drawn, so depth changes only which weight gradients are computed; with
  ``--freeze-always-on`` it stops at the lowest active unit, where module-wise draws, spread over more layers,
  reach lower.

    python experiments/bench_unit_cost.py                                  # SmolLM2-135M-Instruct
    python experiments/bench_unit_cost.py --model .cache/base/deep_llama   # the long preset's base
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from lightning_grass import GRASSCallback, GRASSStrategy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "unit_cost.md"


class CausalLM(pl.LightningModule):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


class StepCost(Callback):
    """Wall and CPU time of each step after probing, the gradient bytes at the step, and each window's depth."""

    def __init__(self, grass: GRASSCallback) -> None:
        self.grass = grass
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.grad_bytes = 0
        self.depths: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = (time.perf_counter(), time.process_time())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grass.phase == "train":
            grads = sum(p.grad.numel() * p.grad.element_size() for p in pl_module.parameters() if p.grad is not None)
            self.grad_bytes = max(self.grad_bytes, grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.grass.phase == "train" and trainer.global_step > self.grass.config.probe_steps:
            self.wall.append(time.perf_counter() - self.started[0])
            self.cpu.append(time.process_time() - self.started[1])
            self.depths.append(min(self.grass.active_layers))


def run(path: Path, unit: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    module = CausalLM(path)
    vocab = module.model.config.vocab_size
    tokens = torch.randint(
        0, vocab, (args.steps * args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    always_on = dict(train_embeddings=False, train_head=False, train_final_norm=False) if args.freeze_always_on else {}
    grass = GRASSCallback(
        unit=unit, n_active=args.n_active, probe_steps=2, sample_every=args.sample_every, seed=0, **always_on
    )
    cost = StepCost(grass)
    strategy = GRASSStrategy(offload="cpu")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=args.steps,
        callbacks=[grass, cost],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=args.batch_size))
    return {
        "unit": unit,
        "median_step": statistics.median(cost.wall),
        "cpu_per_step": statistics.mean(cost.cpu),
        "state_bytes": strategy.offload_stats["peak_resident_bytes"],
        "grad_bytes": cost.grad_bytes,
        "trainable": grass.trainable_parameters_per_step(),
        "depth": statistics.mean(cost.depths),
        "layers": grass.layer_map.num_layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "base" / "smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=22, help="2 probing steps, then 20 measured")
    parser.add_argument("--sample-every", type=int, default=4)
    parser.add_argument("--n-active", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--freeze-always-on", action="store_true", help="freeze embeddings, head and final norm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    runs = [run(args.model, unit, args) for _ in range(args.repeats) for unit in ("layer", "module")]
    by_unit = {unit: [r for r in runs if r["unit"] == unit] for unit in ("layer", "module")}

    def ratio(key: str) -> float:
        return statistics.median(r[key] for r in by_unit["module"]) / statistics.median(
            r[key] for r in by_unit["layer"]
        )

    model = args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model
    command = (
        f"python experiments/bench_unit_cost.py --model {model} --steps {args.steps} --batch-size {args.batch_size} "
        f"--seq-len {args.seq_len} --repeats {args.repeats}" + (" --freeze-always-on" if args.freeze_always_on else "")
    )
    always_on = "frozen" if args.freeze_always_on else "trained (the default)"
    columns = [
        "run",
        "unit",
        "median step (s)",
        "CPU per step (s)",
        "optimizer state + masters at peak (MiB)",
        "gradients at the step (MiB)",
        "trainable parameters per step",
        "mean lowest active layer",
    ]
    lines = [
        "# Module-wise against layer-wise GRASS: step time and device state",
        "",
        "Produced by:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}. "
        f"{runs[0]['layers']} layers, n_active={args.n_active} (module-wise: the same parameter budget), "
        f"GRASSStrategy(offload='cpu'), batch {args.batch_size} x {args.seq_len} tokens, {args.steps - 2} measured "
        f"steps per run after 2 probing steps, a new draw every {args.sample_every} steps; embeddings, head and final "
        f"norm {always_on}. Runs in the order listed.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for index, r in enumerate(runs, start=1):
        cells = [
            str(index),
            r["unit"],
            f"{r['median_step']:.3f}",
            f"{r['cpu_per_step']:.3f}",
            f"{r['state_bytes'] / 2**20:.1f}",
            f"{r['grad_bytes'] / 2**20:.1f}",
            f"{r['trainable']:,}",
            f"{r['depth']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Module-wise over layer-wise, medians over runs: "
        f"step time {ratio('median_step'):.2f}, CPU per step {ratio('cpu_per_step'):.2f}, "
        f"device state {ratio('state_bytes'):.2f}, gradients {ratio('grad_bytes'):.2f}, "
        f"trainable parameters {ratio('trainable'):.3f}.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
