"""Fit the tiny model with GRASS on N CPU processes (gloo) or one, and save what each rank ends with.

Used by tests/strategies/test_ddp.py through a subprocess, because Lightning's DDP launcher re-runs this script for
every other rank: ``python tests/strategies/ddp_run.py OUT --devices 2 --batch-size 2``, and the one-process reference
``python tests/strategies/ddp_run.py OUT --devices 1 --batch-size 2 --accumulate 2``.
"""

import argparse
import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TinyCausalLM, token_batches

from lightning_grass import GRASSCallback, GRASSDDPStrategy, GRASSStrategy

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--samples", type=int, default=16)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--offload", default="none")
parser.add_argument("--max-resident-bytes", default=None)
parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step on one process")
parser.add_argument("--precision", default="32-true")
parser.add_argument("--unit", default="layer")
args = parser.parse_args()


class FinalState(Callback):
    """The optimizer's full state at the end of training, before the strategy frees its offload tier."""

    def on_train_end(self, trainer, pl_module):
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])


final_state = FinalState()
module = TinyCausalLM(weight_decay=0.1)
callback = GRASSCallback(unit=args.unit, probe_steps=2, sample_every=2, seed=0)
offload_dir = args.out / "offload"
if args.devices > 1:
    strategy = GRASSDDPStrategy(
        offload=args.offload,
        offload_dir=offload_dir,
        max_resident_bytes=args.max_resident_bytes,
        process_group_backend="gloo",
    )
else:
    strategy = GRASSStrategy(offload=args.offload, offload_dir=offload_dir, max_resident_bytes=args.max_resident_bytes)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=strategy,
    max_steps=args.steps,
    callbacks=[callback, final_state],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    use_distributed_sampler=False,
    accumulate_grad_batches=args.accumulate,
    precision=args.precision,
)
# The same micro-batches in both set-ups: rank r takes samples r, r + N, r + 2N, ..., and one process that
# accumulates N micro-batches per step takes, at each step, rank 0's micro-batch, then rank 1's, and so on.
dataset = token_batches(num_batches=args.samples // args.batch_size, batch_size=args.batch_size).dataset
if trainer.world_size > 1:
    sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
else:
    per_step = args.batch_size * args.accumulate
    sampler = [
        first + rank
        for start in range(0, len(dataset), per_step)
        for rank in range(args.accumulate)
        for first in range(start, start + per_step, args.accumulate)
    ]
trainer.fit(module, DataLoader(dataset, batch_size=args.batch_size, sampler=sampler))
result = {
    "weights": {name: p.detach().clone() for name, p in module.named_parameters()},
    "history": callback.history,
    "importance": callback.importance,
    "units": callback.units.names,
    "stats": trainer.strategy.offload_stats,
    "optimizer_state": final_state.state,
    "layer_numel": [sum(p.numel() for p in layer.parameters()) for layer in module.model.model.layers],
    "always_on_numel": [p.numel() for name, p in module.named_parameters() if "layers." not in name],
}
torch.save(result, args.out / f"rank{trainer.global_rank}.pt")
