"""One training configuration per fresh process, measured: what bench_offload.py and bench_gpu.py share.

A run builds a Llama from a config (random weights: memory and speed do not depend on them), trains it for a
few steps under ``GRASSStrategy`` with the run's sampler, offload tier, budget, overlap and precision, and
prints its measurements as JSON on its last line of output. Each run is its own process, so its peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the CPU) is its own.

    python experiments/offload_runs.py '{"shape": {...}, "run": {...}, "accelerator": "cpu"}'
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_grass.byte_size import format_bytes


@dataclass(frozen=True)
class ModelShape:
    """A Llama's size and the batch it trains on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    seq_len: int
    batch_size: int
    steps: int

    def parameters(self) -> int:
        """The parameter count (no tied embeddings, no biases)."""
        layer = 4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + 2 * self.vocab * self.hidden + self.hidden


@dataclass(frozen=True)
class Run:
    """One configuration: what trains, where its optimizer state lives, and in which precision."""

    name: str
    sampler: str  # "full" (every layer), "lisa" or "grass"
    offload: str = "none"
    max_resident_bytes: int | None = None
    overlap: bool = True
    precision: str = "32-true"
    n_active: int = 2
    sample_every: int = 5
    probe_steps: int = 3

    def describe(self) -> str:
        """The settings that differ between runs, for a table."""
        budget = "none" if self.max_resident_bytes is None else format_bytes(self.max_resident_bytes)
        sampler = "every layer" if self.sampler == "full" else f"{self.sampler}, n_active={self.n_active}"
        return f"{sampler}; offload={self.offload}; budget {budget}; overlap={self.overlap}; {self.precision}"


def measure(shape: ModelShape, runs: list[Run], accelerator: str, repeats: int = 1) -> dict[str, list[dict]]:
    """Every run ``repeats`` times, each in a fresh process, in ABBA order so that drift hits all alike."""
    results: dict[str, list[dict]] = {run.name: [] for run in runs}
    for repeat in range(repeats):
        for run in runs if repeat % 2 == 0 else runs[::-1]:
            job = json.dumps({"shape": asdict(shape), "run": asdict(run), "accelerator": accelerator})
            done = subprocess.run([sys.executable, __file__, job], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"run {run.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results[run.name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def train(shape: ModelShape, run: Run, accelerator: str) -> dict[str, Any]:
    """Train ``run`` for ``shape.steps`` steps and return its measurements."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_grass import GRASSCallback, GRASSStrategy

    cuda = accelerator == "gpu"
    config = LlamaConfig(
        num_hidden_layers=shape.layers,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.seq_len,
    )
    dtype = torch.bfloat16 if run.precision == "bf16-true" else torch.float32

    class CausalLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            with torch.device("cuda" if cuda else "cpu"):
                self.model = LlamaForCausalLM(config).to(dtype)

        def training_step(self, batch: list, batch_idx: int) -> Any:
            (input_ids,) = batch
            return self.model(input_ids=input_ids, labels=input_ids).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-5, weight_decay=0.01)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_batch_start(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)

    sampler = []
    if run.sampler == "lisa":
        sampler = [GRASSCallback(mode="lisa", n_active=run.n_active, sample_every=run.sample_every, seed=0)]
    elif run.sampler == "grass":
        settings = dict(n_active=run.n_active, probe_steps=run.probe_steps, sample_every=run.sample_every, seed=0)
        sampler = [GRASSCallback(mode="grass", **settings)]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab, (shape.steps * shape.batch_size, shape.seq_len), generator=generator)
    timer = StepTimer()
    module = CausalLM()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as offload_dir:
        strategy = GRASSStrategy(
            offload=run.offload,
            offload_dir=offload_dir,
            max_resident_bytes=run.max_resident_bytes,
            overlap=run.overlap,
        )
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=run.precision,
            max_steps=shape.steps,
            strategy=strategy,
            callbacks=[*sampler, timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=shape.batch_size))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "params": sum(p.numel() for p in module.parameters()),
        "peak_memory_bytes": peak,
        "step_seconds": timer.seconds,
        "stats": trainer.strategy.offload_stats,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(train(ModelShape(**job["shape"]), Run(**job["run"]), job["accelerator"])))
