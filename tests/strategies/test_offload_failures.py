"""Failed fits with an offload tier: one StorageError for a full disk, and no grass-offload-* folder left behind."""

import errno
import logging
import os
import signal

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.accelerators import CPUAccelerator

from lightning_grass import GRASSCallback, GRASSDDPStrategy, GRASSFSDPStrategy, GRASSStrategy
from lightning_grass.errors import StorageError
from lightning_grass.offload import DiskTier, OffloadedOptimizer, TensorStateStore, disk_tier

Q_PROJ_STATE_BYTES = 8 * 32 * 32 + 4  # AdamW moments of a 32x32 weight in float32, and the step counter


class FailsAtStep(TinyCausalLM):
    """Raises ``error`` in the training step of global step 3, counting the offload folders under ``watch`` then."""

    def __init__(self, error: BaseException, watch) -> None:
        super().__init__()
        self.error, self.watch = error, watch
        self.folders_at_failure = None

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            self.folders_at_failure = len(list(self.watch.glob("grass-offload-*")))
            raise self.error
        return super().training_step(batch, batch_idx)


def fit(module, strategy):
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0)
    make_trainer(max_steps=8, strategy=strategy, callbacks=[callback]).fit(module, token_batches())


def spy_on_close(monkeypatch):
    """Record what every TensorStateStore.close() call raised (None when it returned)."""
    outcomes = []
    real_close = TensorStateStore.close

    def close(self):
        try:
            real_close(self)
        except BaseException as error:
            outcomes.append(error)
            raise
        outcomes.append(None)

    monkeypatch.setattr(TensorStateStore, "close", close)
    return outcomes


def test_a_full_offload_dir_stops_fit_with_one_storage_error_and_removes_the_folder(tmp_path, monkeypatch, caplog):
    def no_space(descriptor, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_tier, "_write_all", no_space)
    closes = spy_on_close(monkeypatch)
    # 64 KiB holds less than one layer's states: they stream, so the first step waits for its first write-back.
    strategy = GRASSStrategy(offload="disk", offload_dir=tmp_path, max_resident_bytes="64KiB")
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError) as raised:
        fit(TinyCausalLM(), strategy)
    message = str(raised.value)
    assert message.startswith(
        f"writing {Q_PROJ_STATE_BYTES} bytes of optimizer state to the offload folder {tmp_path}{os.sep}grass-offload-"
    )
    assert message.endswith(
        " failed: No space left on device; free at least 8.00 KiB there, or pass an offload_dir on a disk with more "
        "room"
    )
    assert "\n" not in message
    assert any(entry.name == "optimizer_step" for entry in raised.traceback), "raised in the step, not in teardown"
    assert closes == [None], "teardown closed the store once, without raising the error again"
    assert not [r for r in caplog.records if "write-back failed" in r.getMessage()]
    assert list(tmp_path.iterdir()) == [], "teardown deleted the grass-offload-* folder"


@pytest.mark.parametrize("budget", [None, "64KiB"], ids=["keep", "stream"])
def test_an_exception_in_a_step_leaves_no_offload_folder_and_is_the_one_raised(tmp_path, monkeypatch, budget):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # offload_dir=None puts the folder in the temp folder
    closes = spy_on_close(monkeypatch)
    module = FailsAtStep(RuntimeError("boom at step 3"), watch=tmp_path)
    with pytest.raises(RuntimeError, match=r"^boom at step 3$"):
        fit(module, GRASSStrategy(offload="disk", max_resident_bytes=budget))
    assert module.folders_at_failure == 1
    assert closes == [None]
    assert list(tmp_path.glob("grass-offload-*")) == []


def test_keyboard_interrupt_in_a_step_leaves_no_offload_folder(tmp_path):
    module = FailsAtStep(KeyboardInterrupt(), watch=tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as raised:  # Lightning tears down, then exits
            fit(module, GRASSStrategy(offload="disk", offload_dir=tmp_path))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from the interrupt on
    assert raised.value.code == 1
    assert module.folders_at_failure == 1
    assert list(tmp_path.iterdir()) == []


def _stepped_params_on_a_full_disk(tmp_path, monkeypatch):
    """Two parameters stepped once by AdamW, and a disk tier on which every write fails from now on."""

    def no_space(descriptor, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    optimizer = torch.optim.AdamW(params)
    for param in params:
        param.grad = torch.ones_like(param)
    tier = DiskTier(tmp_path)
    monkeypatch.setattr(disk_tier, "_write_all", no_space)
    return params, optimizer, tier


def _with_failed_store(strategy, tmp_path, monkeypatch):
    params, optimizer, tier = _stepped_params_on_a_full_disk(tmp_path, monkeypatch)
    offloaded = OffloadedOptimizer(optimizer, TensorStateStore(optimizer, params, tier))
    offloaded.step()
    offloaded.set_active([])  # both write-backs fail in the background
    with pytest.raises(StorageError):
        offloaded.store.flush()  # raises for the first; the second is still in flight for teardown
    strategy._offloaded = offloaded
    return strategy


@pytest.mark.parametrize(
    "make_strategy",
    [
        lambda tmp, mp: _with_failed_store(GRASSStrategy(offload="disk"), tmp, mp),
        lambda tmp, mp: _with_failed_store(GRASSDDPStrategy(offload="disk"), tmp, mp),
        lambda tmp, mp: _with_failed_store(GRASSFSDPStrategy(offload="disk"), tmp, mp),
    ],
    ids=["grass", "grass_ddp", "grass_fsdp"],
)
def test_every_strategy_tears_down_a_failed_disk_tier_without_raising_and_deletes_its_folder(
    tmp_path, monkeypatch, make_strategy
):
    strategy = make_strategy(tmp_path, monkeypatch)
    strategy.accelerator = CPUAccelerator()
    strategy.cluster_environment = LightningEnvironment()  # what the Trainer sets for the parallel strategies
    assert len(list(tmp_path.glob("grass-offload-*"))) == 1
    strategy.teardown()
    strategy.teardown()
    assert list(tmp_path.iterdir()) == []
