"""Fit the tiny model with GRASS and the disk tier, checkpointing every step; optionally resume.

Used by tests/end_to_end/test_resume_after_interruption.py through a subprocess, so that the run can be
killed with SIGKILL:
``python tests/end_to_end/resume_run.py OUT --max-steps 12 [--resume] [--step-seconds 0.3]``.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TinyCausalLM, make_trainer, token_batches

from lightning_grass import GRASSCallback, GRASSStrategy

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--max-steps", type=int, default=12)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--step-seconds", type=float, default=0.0, help="slow each step down, to be killed mid-run")
args = parser.parse_args()


class Slow(Callback):
    def on_train_batch_end(self, *unused):
        time.sleep(args.step_seconds)


checkpoints = ModelCheckpoint(args.out / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
callback = GRASSCallback(probe_steps=2, sample_every=3, seed=0)
strategy = GRASSStrategy(offload="disk", offload_dir=args.out / "offload")
trainer = make_trainer(
    max_steps=args.max_steps, strategy=strategy, callbacks=[callback, checkpoints, Slow()], enable_checkpointing=True
)
module = TinyCausalLM(weight_decay=0.1)
last = args.out / "ckpt" / "last.ckpt"
trainer.fit(module, token_batches(num_batches=1), ckpt_path=last if args.resume else None)
torch.save(
    {"weights": {n: p.detach().clone() for n, p in module.named_parameters()}, "history": callback.history},
    args.out / "final.pt",
)
