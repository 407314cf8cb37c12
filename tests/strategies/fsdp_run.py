"""Fit the tiny Llama with GRASS on FSDP2 over N CPU processes (gloo), or on one process; save what each rank ends with.

Used by tests/strategies/test_fsdp.py through a subprocess, because Lightning's launcher re-runs this script for every
other rank: ``python tests/strategies/fsdp_run.py OUT --devices 2 --batch-size 8``, and the one-process references
``python tests/strategies/fsdp_run.py OUT --devices 1 --batch-size 16`` (the same global batches) or
``--devices 1 --batch-size 8 --accumulate 2`` (the ranks' micro-batches, accumulated).
"""

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TinyCausalLM, token_batches

from lightning_grass import GRASSCallback, GRASSFSDPStrategy, GRASSStrategy, discover_layers
from lightning_grass.offload import device_bytes_while_stepped

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=8, help="samples per process and micro-batch")
parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step on one process")
parser.add_argument("--steps", type=int, default=14)
parser.add_argument("--samples", type=int, default=64, help="samples per epoch")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--mode", default="grass")
parser.add_argument("--n-active", type=int, default=1)
parser.add_argument("--unit", default="layer")
parser.add_argument("--probe-steps", type=int, default=2)
parser.add_argument("--sample-every", type=int, default=3)
parser.add_argument("--offload", default="none")
parser.add_argument("--budget-tensors", type=int, default=0, help="max_resident_bytes: this many largest shards")
parser.add_argument("--offload-always-on", action="store_true")
parser.add_argument("--precision", default="32-true")
parser.add_argument("--save-every", type=int, default=0)
parser.add_argument("--resume", type=Path, default=None)
parser.add_argument("--validate-from", type=Path, default=None, help="only trainer.validate from this checkpoint")
parser.add_argument("--no-lazy-init", action="store_true", help="skip the strategy's all-trainable lazy init")
args = parser.parse_args()
if args.no_lazy_init:
    GRASSFSDPStrategy._lazy_init = lambda self: None


def local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def inner_optimizer(trainer):
    optimizer = trainer.optimizers[0]
    return getattr(optimizer, "optimizer", optimizer)


def full_state(trainer, pl_module):
    """Every parameter's optimizer state by name, offloaded ones included, as this rank's local CPU clones."""
    optimizer = trainer.optimizers[0]
    names = {id(p): n for n, p in pl_module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        names[id(params[index])]: {k: local(v).clone() if torch.is_tensor(v) else v for k, v in state.items()}
        for index, state in optimizer.state_dict()["state"].items()
    }


def shard_budget(module, tensors, world_size, precision):
    """``tensors`` times what the largest of this rank's shards needs while stepped (AdamW, as the module's)."""
    mastered = precision == "bf16-true"
    needs = []
    for p in module.parameters():
        rows = -(-p.shape[0] // world_size)  # FSDP2 shards dim 0; rank 0 holds the largest part
        dtype = torch.bfloat16 if mastered else p.dtype
        shard = torch.nn.Parameter(torch.empty(rows, *p.shape[1:], dtype=dtype, device="meta"))
        needs.append(device_bytes_while_stepped(torch.optim.AdamW([shard]), shard, mastered))
    return tensors * max(needs)


class Observer(Callback):
    """Per step: which layers hold a gradient and a resident optimizer state; at saves, what the checkpoint holds."""

    def __init__(self):
        self.steps, self.saves = [], []
        self.master_check = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers = pl_module.model.model.layers
        state = inner_optimizer(trainer).state
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.steps.append(
            {
                "active": list(grass.active_layers),
                "active_unit_names": sorted(
                    names[id(p)] for u in grass.active_units for p in grass.units.parameters[u]
                ),
                "with_grad_names": sorted(n for n, p in pl_module.named_parameters() if p.grad is not None),
                "phase": grass.phase,
                "with_grad": [i for i, b in enumerate(layers) if any(p.grad is not None for p in b.parameters())],
                "grad_bytes": sum(local(p.grad).numel() * 4 for p in pl_module.parameters() if p.grad is not None),
                "with_state_before_step": [i for i, b in enumerate(layers) if any(p in state for p in b.parameters())],
            }
        )
        if args.precision == "bf16-true" and self.master_check is None and grass.phase != "probe":
            names = {id(p): n for n, p in pl_module.named_parameters()}
            param = next(p for p in layers[grass.active_layers[0]].parameters() if p.grad is not None)
            before = full_state(trainer, pl_module).get(names[id(param)])
            if before:  # a step of the window after its first, where the master exists
                self.master_check = {
                    "name": names[id(param)],
                    "before": before,
                    "grad": local(param.grad).float().clone(),
                }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.steps or "active_after" in self.steps[-1]:
            return  # a micro-batch that accumulated without a step
        layers = pl_module.model.model.layers
        state = inner_optimizer(trainer).state
        self.steps[-1]["with_state_after_step"] = [
            i for i, b in enumerate(layers) if any(p in state for p in b.parameters())
        ]
        self.steps[-1]["active_after"] = list(grass.active_layers)
        check = self.master_check
        if check is not None and "after" not in check:
            check["after"] = full_state(trainer, pl_module)[check["name"]]
            check["weight_after"] = local(dict(pl_module.named_parameters())[check["name"]]).detach().clone()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves.append(
            {
                "step": trainer.global_step,
                "saved_states": len(checkpoint["optimizer_states"][0]["state"]),
                "resident_states": len(inner_optimizer(trainer).state),
            }
        )

    def on_train_end(self, trainer, pl_module):
        self.final_state = full_state(trainer, pl_module)
        self.stats = dict(trainer.strategy.offload_stats)


grass = GRASSCallback(
    mode=args.mode,
    unit=args.unit,
    n_active=args.n_active,
    probe_steps=args.probe_steps,
    sample_every=args.sample_every,
    seed=0,
)
observer = Observer()
callbacks = [grass, observer]
if args.save_every:
    callbacks.append(
        ModelCheckpoint(dirpath=args.out / "ckpt", every_n_train_steps=args.save_every, save_top_k=-1, save_last=False)
    )


class Validated(TinyCausalLM):
    def validation_step(self, batch, batch_idx):
        (input_ids,) = batch
        self.log("val_loss", self.model(input_ids=input_ids, labels=input_ids).loss, sync_dist=True)


module = (Validated if args.validate_from else TinyCausalLM)(lr=args.lr, weight_decay=0.1)
if args.devices > 1:
    budget = shard_budget(module, args.budget_tensors, args.devices, args.precision) if args.budget_tensors else None
    strategy = GRASSFSDPStrategy(
        offload=args.offload,
        offload_dir=args.out / "offload",
        max_resident_bytes=budget,
        offload_always_on=args.offload_always_on,
        process_group_backend="gloo",
    )
else:
    strategy = GRASSStrategy(offload="none")
trainer = pl.Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=strategy,
    max_steps=args.steps,
    callbacks=callbacks,
    logger=False,
    enable_checkpointing=bool(args.save_every),
    enable_progress_bar=False,
    enable_model_summary=False,
    use_distributed_sampler=False,
    accumulate_grad_batches=args.accumulate,
    precision=args.precision,
)
# Global batch g holds samples [16 g, 16 g + 16). Rank r of 2 takes its half [16 g + 8 r, 16 g + 8 r + 8); one
# process takes all 16 at once, or the two halves as two accumulated micro-batches in rank order.
dataset = token_batches(num_batches=args.samples, batch_size=1).dataset
global_batch = 16
if trainer.world_size > 1:
    per_rank = global_batch // trainer.world_size
    order = [
        start + trainer.global_rank * per_rank + i
        for start in range(0, len(dataset), global_batch)
        for i in range(per_rank)
    ]
else:
    order = list(range(len(dataset)))
loader = DataLoader(dataset, batch_size=args.batch_size, sampler=order)
if args.validate_from is not None:
    trainer.validate(module, loader, ckpt_path=args.validate_from)
    observer.final_state = {}
else:
    trainer.fit(module, loader, ckpt_path=args.resume)
weights = {
    name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in module.named_parameters()
}
result = {
    "weights": weights,
    "history": grass.history,
    "importance": grass.importance,
    "steps": observer.steps,
    "saves": observer.saves,
    "final_state": observer.final_state,
    "stats": getattr(observer, "stats", {}),
    "budget": getattr(trainer.strategy, "max_resident_bytes", None),
    "master_check": observer.master_check,
    "blocks_sharded": [isinstance(block, FSDPModule) for block in discover_layers(module).blocks],
}
torch.save(result, args.out / f"rank{trainer.global_rank}.pt")
