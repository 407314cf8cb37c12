"""Does a bf16 model fine-tune like an fp32 one? With and without GRASSStrategy's fp32 master weights.

A small Llama trains every layer for 30 steps under ``GRASSStrategy(offload="none")``, once in fp32 and in
``bf16-true`` with ``master_weights`` on and off, at two fine-tuning learning rates. The update of the block
weights (final minus initial, both in the dtype that trains) is compared with the fp32 run's: the ratio of
norms, the cosine, and the share of elements that moved at all. Writes ``experiments/results/bf16_masters.md``
and ``bf16_masters.png``.

    python experiments/bf16_masters.py
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_grass import GRASSStrategy
from lightning_grass.app.plots import save_figure

RESULTS = Path(__file__).parent / "results"
LEARNING_RATES = (2e-5, 1e-4)
STEPS = 30
CONFIG = LlamaConfig(
    num_hidden_layers=4,
    hidden_size=64,
    intermediate_size=176,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=32,
)


class CausalLM(pl.LightningModule):
    """A Llama from ``CONFIG`` trained with AdamW over all parameters."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(CONFIG)
        self.lr = lr

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Causal-LM loss on the batch."""
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over every parameter."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def block_update(precision: str, master_weights: bool, lr: float) -> torch.Tensor:
    """The block weights' change over the run, in float32, from the trained dtype's starting values."""
    module = CausalLM(lr)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    start = {n: p.detach().to(dtype).float().clone() for n, p in module.named_parameters() if ".layers." in n}
    tokens = torch.randint(0, CONFIG.vocab_size, (8 * 4, 32), generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        precision=precision,
        strategy=GRASSStrategy(offload="none", master_weights=master_weights),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(tokens), batch_size=4))
    return torch.cat([(p.detach().float() - start[n]).flatten() for n, p in module.named_parameters() if n in start])


def main() -> None:
    """Measure every setting, write the table and the figure."""
    rows = []
    figure_data = {}
    for lr in LEARNING_RATES:
        reference = block_update("32-true", True, lr)
        for masters in (True, False):
            update = block_update("bf16-true", masters, lr)
            ratio = float(update.norm() / reference.norm())
            cosine = float(torch.nn.functional.cosine_similarity(update, reference, dim=0))
            moved = float((update != 0).float().mean())
            figure_data[(lr, masters)] = (ratio, cosine)
            label = "on" if masters else "off"
            rows.append(f"| {lr:g} | {label} | {ratio:.3f} | {cosine:.3f} | {moved:.1%} |")

    fig = Figure(figsize=(7.0, 3.2))
    for ax, (index, title) in zip(
        fig.subplots(1, 2), enumerate(("update norm / fp32's", "cosine with fp32's")), strict=True
    ):
        for offset, masters in ((-0.2, True), (0.2, False)):
            values = [figure_data[(lr, masters)][index] for lr in LEARNING_RATES]
            ax.bar(
                [i + offset for i in range(len(LEARNING_RATES))],
                values,
                width=0.4,
                label=f"masters {'on' if masters else 'off'}",
            )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(LEARNING_RATES)), [f"lr {lr:g}" for lr in LEARNING_RATES])
        ax.set_title(title)
        ax.set_ylim(0, 1.2)
    fig.axes[0].legend(loc="lower right")
    save_figure(fig, RESULTS / "bf16_masters.png")

    params = sum(p.numel() for p in CausalLM(1e-3).parameters())
    text = "\n".join(
        [
            "# bf16 fine-tuning with and without fp32 master weights",
            "",
            f"`python experiments/bf16_masters.py`: a Llama (4 layers, hidden 64, {params:,} "
            f"parameters, random weights) trains every layer for {STEPS} steps of AdamW on random tokens (batch "
            "4 x 32) under `GRASSStrategy(offload='none')`, on the CPU. The block weights' update (final minus "
            "initial, in the dtype that trains) is compared with the same run in fp32.",
            "",
            "| learning rate | fp32 masters | update norm / fp32's | cosine with fp32's | elements that moved |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "Without masters, AdamW's bf16 update of each weight is rounded to the weight's bf16 grid, and updates "
            "smaller than half its last bit vanish. With masters, the optimizer steps an fp32 copy with fp32 "
            "moments, and only the weight used in the forward pass is rounded.",
            "",
            "![update norm and cosine against fp32](bf16_masters.png)",
            "",
        ]
    )
    (RESULTS / "bf16_masters.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
