"""Without GRASSCallback, GRASSStrategy and GRASSDDPStrategy train as Lightning's own strategies do.

One matrix over optimizers, precisions and what Lightning does around an optimizer, compared with
``torch.equal``. What Lightning does comes in two sets, because torch's LR schedulers refuse a parameter group
added after them: an LR scheduler with gradient clipping, and a ``BaseFinetuning`` that adds a parameter group
at epoch 1 with gradient accumulation.

- ``32-true``: the weights and the optimizer state equal ``SingleDeviceStrategy``'s.
- ``bf16-true``: GRASS steps fp32 masters. The reference is the same run under ``SingleDeviceStrategy`` with
  the fp32 masters as the module's parameters: each step evaluates the bf16 model at the masters rounded to
  bf16 (``functional_call``), so the masters' gradients are the bf16 gradients cast to fp32, and the same
  optimizer steps them. GRASS's bf16 weights equal the reference's parameters rounded to bf16, its masters
  and states equal the reference's parameters and states.

Run as a script, this file is the DDP case's worker: ``python test_lightning_parity.py OUT`` on each rank,
with the rank in ``LOCAL_RANK``.
"""

from __future__ import annotations

import copy
import errno
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.precision import HalfPrecision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.migration.utils import _set_version
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import TinyCausalLM, make_trainer, token_batches

from lightning_grass import GRASSDDPStrategy, GRASSStrategy
from lightning_grass.offload import MASTER_KEY, OffloadedOptimizer

OPTIMIZERS = {
    "adamw_for_loop": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "lbfgs": lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=3, history_size=4),
}
# A bf16 bound: clamping a bf16 gradient, or its fp32 cast, to it gives the same values. Norm clipping computes the
# norm of bf16 gradients in bf16 and the reference's in fp32, which round differently.
BF16_CLIP_VALUE = 2.0**-7


class UnfreezeFirstBlock(BaseFinetuning):
    """Freezes the first block before training; at epoch 1 adds it to the optimizer as a new parameter group."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.model.model.layers[0])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.model.model.layers[0], optimizer)


def _round_to_bf16(param: Tensor) -> None:
    param.grad.copy_(param.grad.to(torch.bfloat16))


def _bf16_all_reduce(state, bucket):  # no annotations: DDP checks them against its own types
    """Average an fp32 bucket of bf16 values in bf16, as DDP averages the gradients of bf16 parameters.

    The cast is exact; the division by the world size (2) is exact in bf16, and the sum rounds to bf16.
    (torch's ``bf16_compress_hook`` is the same, but refuses a CPU process group.)
    """
    buffer = bucket.buffer()
    averaged = buffer.to(torch.bfloat16).div_(dist.get_world_size())
    return dist.all_reduce(averaged, async_op=True).get_future().then(lambda done: buffer.copy_(done.value()[0]))


class ParityModule(TinyCausalLM):
    """A 2-block Llama trained over the parameters that require a gradient (as BaseFinetuning asks).

    With ``fp32_masters``, the reference for bf16-true: the parameters are fp32 masters that start at the bf16
    weights, and each step evaluates a bf16 copy of the model at the masters rounded to bf16. Accumulated
    gradients are rounded to bf16 after each micro-batch, as a bf16 parameter's gradient is.
    """

    def __init__(self, optimizer: str, scheduler: bool, fp32_masters: bool = False) -> None:
        super().__init__(num_layers=2, optimizer=optimizer, scheduler=scheduler)
        self.fp32_masters = fp32_masters
        if fp32_masters:
            self.model.to(torch.bfloat16).to(torch.float32)
            self._bf16_model = [copy.deepcopy(self.model).to(torch.bfloat16).requires_grad_(False)]
            for p in self.model.parameters():
                p.register_post_accumulate_grad_hook(_round_to_bf16)

    def training_step(self, batch, batch_idx):
        if not self.fp32_masters:
            return super().training_step(batch, batch_idx)
        (input_ids,) = batch
        weights = {name: p.to(torch.bfloat16) for name, p in self.model.named_parameters()}
        inputs = dict(input_ids=input_ids, labels=input_ids)
        return torch.func.functional_call(self._bf16_model[0], weights, kwargs=inputs).loss

    def on_fit_start(self):
        if self.fp32_masters and isinstance(self.trainer.strategy.model, DistributedDataParallel):
            self.trainer.strategy.model.register_comm_hook(None, _bf16_all_reduce)

    def configure_optimizers(self):
        optimizer = OPTIMIZERS[self.optimizer_name]([p for p in self.parameters() if p.requires_grad])
        if not self.scheduler:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Fp32MastersPrecision(HalfPrecision):
    """bf16-true's forward context for the reference, whose parameters (the masters) stay fp32."""

    def convert_module(self, module):
        return module


CASES = ["scheduled_clipped", "finetuned_accumulated"]


def trainer_settings(case: str, precision: str) -> dict:
    # The gradients' norm is about 1.7, and 13% of their elements exceed BF16_CLIP_VALUE: both clippings act.
    if case == "finetuned_accumulated":
        return dict(max_epochs=2, accumulate_grad_batches=2, extra_callbacks=[UnfreezeFirstBlock()])
    if precision == "bf16-true":
        return dict(max_steps=3, gradient_clip_val=BF16_CLIP_VALUE, gradient_clip_algorithm="value")
    return dict(max_steps=3, gradient_clip_val=0.5, gradient_clip_algorithm="norm")


# The cores are shared: contended intra-op threads make these tiny fits ten times slower.
pytestmark = pytest.mark.usefixtures("one_thread")


def fit(strategy, precision, optimizer, case, reference=False, devices=1, **settings):
    """Fit a ParityModule (as the reference for bf16-true with ``reference``) and return what it ends with."""
    fp32_masters = reference and precision == "bf16-true"
    module = ParityModule(optimizer, scheduler=case == "scheduled_clipped", fp32_masters=fp32_masters)
    settings = {**trainer_settings(case, precision), **settings}
    callbacks = settings.pop("extra_callbacks", [])
    if fp32_masters:
        settings["plugins"] = [Fp32MastersPrecision("bf16-true")]
    else:
        settings["precision"] = precision
    trainer = make_trainer(strategy=strategy, callbacks=callbacks, devices=devices, **settings)
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, token_batches(num_batches=4))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], "the scheduler saw no optimizer step"
    return outcome(trainer, module, start)


def outcome(trainer, module, start):
    """Weights, fp32 masters and state (without the masters) by parameter name, the parameter groups, the start."""
    optimizer = trainer.optimizers[0]
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state_dict = optimizer.state_dict()
    masters, state = {}, {}
    for index, values in state_dict["state"].items():
        values = dict(values)
        if MASTER_KEY in values:
            masters[order[index]] = values.pop(MASTER_KEY)
        state[order[index]] = values
    return {
        "weights": {name: p.detach().clone() for name, p in module.named_parameters()},
        "masters": masters,
        "state": {name: values for name, values in state.items() if values},
        "param_groups": state_dict["param_groups"],
        "wrapped": isinstance(optimizer, OffloadedOptimizer),
        "start": start,
        "rank": trainer.global_rank,
    }


def assert_same(expected, actual, where="state"):
    """Equal nested optimizer state: tensors with torch.equal and the same dtype, everything else with ==."""
    if isinstance(expected, Tensor):
        assert expected.dtype == actual.dtype and torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key, value in expected.items():
            assert_same(value, actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), where
        for index, (value, other) in enumerate(zip(expected, actual, strict=True)):
            assert_same(value, other, f"{where}[{index}]")
    else:
        assert expected == actual, where


def assert_trained_alike(grass, reference, precision):
    """fp32: equal weights and states. bf16: the masters and states equal the reference's, the weights round it."""
    assert grass["wrapped"] == (precision == "bf16-true"), "only bf16 weights need the wrapper (for masters)"
    for name, weight in grass["weights"].items():
        expected = reference["weights"][name]
        if precision == "bf16-true":
            assert torch.equal(grass["masters"][name], expected), name
            expected = expected.to(torch.bfloat16)
        assert weight.dtype == expected.dtype and torch.equal(weight, expected), name
    assert_same(reference["state"], grass["state"])
    assert_same(reference["param_groups"], grass["param_groups"], "param_groups")


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize(
    ("optimizer", "case"),
    # LBFGS steps one parameter group, its first: a group added later is never stepped, under any strategy.
    [(name, case) for name in sorted(OPTIMIZERS) for case in CASES if (name, case) != ("lbfgs", CASES[1])],
)
def test_grass_strategy_without_the_callback_trains_like_single_device(optimizer, case, precision):
    reference = fit(SingleDeviceStrategy("cpu"), precision, optimizer, case, reference=True)
    grass = fit(GRASSStrategy(), precision, optimizer, case)
    assert_trained_alike(grass, reference, precision)
    if case == "finetuned_accumulated":
        assert len(grass["param_groups"]) == 2, "BaseFinetuning added the first block as a group at epoch 1"
        trained = grass["masters"] or grass["weights"]
        for name in [name for name in grass["weights"] if name.startswith("model.model.layers.0.")]:
            start = grass["start"][name].float()  # where the weight, or its master, started
            assert not torch.equal(trained[name].float(), start), f"the unfrozen {name} was stepped"


LIGHTNING_AND_GRASS = [
    pytest.param(lambda: SingleDeviceStrategy("cpu"), id="SingleDeviceStrategy"),
    pytest.param(GRASSStrategy, id="GRASSStrategy"),
]


def boring_trainer(strategy, tmp_path, **settings):
    """A Trainer as in Lightning's ``test_checkpoint_connector.py``, on ``strategy``."""
    return Trainer(default_root_dir=tmp_path, strategy=strategy(), accelerator="cpu", devices=1, **settings)


@pytest.mark.parametrize("strategy", LIGHTNING_AND_GRASS)
def test_a_save_where_permissions_cannot_change_succeeds_as_in_lightning(tmp_path, monkeypatch, strategy):
    # Some network and FUSE filesystems refuse chmod; Lightning's plugin writes there without changing permissions.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    trainer = boring_trainer(strategy, tmp_path, max_steps=1, enable_checkpointing=False, logger=False)
    trainer.fit(BoringModel())
    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    trainer.save_checkpoint(tmp_path / "saved.ckpt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "saved.ckpt", weights_only=True)["global_step"] == 1


@pytest.mark.parametrize("strategy", LIGHTNING_AND_GRASS)
def test_a_checkpoint_without_a_global_step_resumes_as_in_lightning(tmp_path, strategy):
    # Lightning's test_stateful_trainer_ckpt_path_support: the checkpoint NeMo's experiment manager writes.
    model = BoringModel()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": {}, "lr_schedulers": {}}
    _set_version(checkpoint, "2.0.0")
    torch.save(checkpoint, tmp_path / "foo.ckpt")
    trainer = boring_trainer(strategy, tmp_path, fast_dev_run=True)
    trainer.fit(model, ckpt_path=tmp_path / "foo.ckpt")
    assert trainer.global_step == 1


@pytest.mark.parametrize("strategy", LIGHTNING_AND_GRASS)
def test_a_missing_checkpoint_is_reported_in_lightnings_words(tmp_path, strategy):
    # Lightning's test_hpc_restore_attempt, case 2.
    trainer = boring_trainer(strategy, tmp_path, max_steps=3)
    with pytest.raises(FileNotFoundError) as raised:
        trainer.fit(BoringModel(), ckpt_path="not existing")
    assert str(raised.value) == "Checkpoint file not found: not existing"


DDP_PRECISIONS = ["32-true", "bf16-true"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_grass_ddp_strategy_without_the_callback_trains_like_ddp(tmp_path):
    # Both ranks run both strategies, in one process group: two processes instead of four (each import costs).
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "LOCAL_RANK": str(rank), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        env.update(MASTER_PORT=port, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        command = [sys.executable, __file__, str(tmp_path)]
        ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in ranks:
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 0, output[-4000:]
    for precision in DDP_PRECISIONS:
        results = [torch.load(tmp_path / f"{precision}-rank{rank}.pt", weights_only=False) for rank in range(2)]
        for grass, reference in results:
            assert_trained_alike(grass, reference, precision)
        assert_same(results[0][0]["weights"], results[1][0]["weights"], "replicas")


def ddp_worker(out: Path) -> None:
    """Fit GRASSDDPStrategy and DDPStrategy on this rank, one after the other, and save what each ends with."""
    torch.set_num_threads(1)
    for precision in DDP_PRECISIONS:
        settings = dict(precision=precision, optimizer="adamw_for_loop", case="scheduled_clipped", devices=2)
        grass = fit(GRASSDDPStrategy(process_group_backend="gloo"), accumulate_grad_batches=2, **settings)
        reference = fit(
            DDPStrategy(process_group_backend="gloo"), reference=True, accumulate_grad_batches=2, **settings
        )
        torch.save((grass, reference), out / f"{precision}-rank{grass['rank']}.pt")


if __name__ == "__main__":
    ddp_worker(Path(sys.argv[1]))
