"""GRASSStrategy inside a Trainer: names, devices, tiers, bit-identity, residency, checkpoints, config routes."""

import copy
import csv
import logging

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

import lightning_grass
from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.offload import OffloadedOptimizer


def fit(strategy, max_steps=8, callback=None, module=None, **kwargs):
    module = module or TinyCausalLM(weight_decay=0.1)
    callbacks = [callback or GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0)]
    callbacks += kwargs.pop("extra_callbacks", [])
    trainer = make_trainer(max_steps=max_steps, strategy=strategy, callbacks=callbacks, **kwargs)
    trainer.fit(module, token_batches())
    return module, trainer


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def adamw_state_bytes(params):
    """Exp_avg, exp_avg_sq (float32) and the float32 step counter of each parameter."""
    return sum(8 * p.numel() + 4 for p in params)


def host_region_bytes(params):
    """The host tier's regions for AdamW states: each tensor's bytes rounded up to 512, and 512 more for each of
    its state's tensors after the first (exp_avg, exp_avg_sq, step: each starts on a 512-byte boundary)."""
    return sum(-(-(8 * p.numel() + 4) // 512) * 512 + 2 * 512 for p in params)


LAYER_STATE_BYTES = adamw_state_bytes(TinyCausalLM().model.model.layers[0].parameters())
LAYER_HOST_BYTES = host_region_bytes(TinyCausalLM().model.model.layers[0].parameters())
ALWAYS_ON_STATE_BYTES = adamw_state_bytes(p for name, p in TinyCausalLM().named_parameters() if "layers." not in name)


@pytest.mark.parametrize(
    ("name", "tier"), [("grass", "none"), ("grass_offload_cpu", "cpu"), ("grass_offload_disk", "disk")]
)
def test_registered_names_build_the_strategy(name, tier):
    assert name in StrategyRegistry
    trainer = make_trainer(max_steps=1, strategy=name)
    assert isinstance(trainer.strategy, GRASSStrategy)
    assert trainer.strategy.offload_tier == tier
    assert trainer.strategy.root_device == torch.device("cpu")


def test_root_device_follows_the_devices_lightning_selects():
    by_name = GRASSStrategy()
    by_name.parallel_devices = [torch.device("cuda", 1)]  # what the connector does for strategy="grass"
    assert by_name.root_device == torch.device("cuda", 1)
    assert by_name.offload_tier == "cpu", "auto offloads to pinned host memory on CUDA"
    explicit = GRASSStrategy(device="cpu")
    explicit.parallel_devices = [torch.device("cuda", 1)]
    assert explicit.root_device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"trains on one device, but the Trainer selected 2 \(cuda:0, cuda:1\)"):
        GRASSStrategy().parallel_devices = [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(offload="nvme"), ValueError, r"offload='nvme' is not supported; use one of \('auto', 'none', 'cpu'"),
        (dict(max_resident_bytes=0), ValueError, "max_resident_bytes=0 must be at least one byte"),
        (dict(max_resident_bytes="12 parsecs"), ValueError, r"max_resident_bytes='12 parsecs' is not a byte size"),
        (dict(max_resident_bytes=1.5), TypeError, r"max_resident_bytes=1.5 must be a number of bytes or a string"),
        (dict(offload="none", max_resident_bytes="1GiB"), ValueError, r"but offload='none' offloads nothing"),
        (dict(master_weights="yes"), TypeError, r"master_weights='yes' must be True or False"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        GRASSStrategy(**kwargs)


def test_every_tier_gives_the_same_weights_as_no_offload(tmp_path):
    reference, _ = fit(GRASSStrategy(offload="none"))
    for strategy in (GRASSStrategy(offload="cpu"), GRASSStrategy(offload="disk", offload_dir=tmp_path)):
        module, trainer = fit(strategy)
        assert same_weights(reference, module), strategy.offload
        assert trainer.strategy.offload_stats["bytes_to_device"] > 0


def test_no_offload_keeps_states_of_deactivated_layers_unlike_a_plain_strategy():
    _, kept = fit(GRASSStrategy(offload="none"))
    _, dropped = fit(SingleDeviceStrategy(device="cpu"))
    all_layers = 4 * 9 + 3  # every layer was active at some step; plus embeddings, norm and head
    assert len(kept.optimizers[0].state) == all_layers
    assert len(dropped.optimizers[0].state) < all_layers


def test_a_budget_bounds_the_offloaded_states_on_the_device_and_the_tier_keeps_one_file_per_tensor(tmp_path):
    seen = []

    class WatchFiles(Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(sorted(p.name for p in tmp_path.glob("grass-offload-*/*.bin")))

    budget = 2 * LAYER_STATE_BYTES  # three active layers per step do not fit: their tensors stream
    callback = GRASSCallback(mode="lisa", n_active=3, sample_every=1, seed=0)
    strategy = GRASSStrategy(offload="disk", offload_dir=tmp_path, max_resident_bytes=budget)
    reference, _ = fit(
        GRASSStrategy(offload="none"), callback=GRASSCallback(mode="lisa", n_active=3, sample_every=1, seed=0)
    )
    module, trainer = fit(strategy, callback=callback, extra_callbacks=[WatchFiles()])
    stats = trainer.strategy.offload_stats
    assert same_weights(reference, module)
    assert 0 < stats["peak_resident_bytes"] <= budget + ALWAYS_ON_STATE_BYTES
    assert stats["resident_tensors"] == 0, "after fit every write-back has finished"
    assert len(seen[-1]) == 4 * 9, "every layer's 9 tensors have been active and have a state file"
    assert list(tmp_path.iterdir()) == [], "teardown deleted the run's folder"


def test_a_budget_smaller_than_one_row_of_a_tensor_is_refused_before_training():
    module = TinyCausalLM()
    before = copy.deepcopy(module.state_dict())
    # down_proj (32 x 64) has the longest rows: 64 fp32 elements, two moments and the for-loop's two temporaries,
    # and the step counter.
    with pytest.raises(
        ValueError,
        match=r"^max_resident_bytes=1000 bytes \(1000 B\) cannot hold model\.model\.layers\.0\.mlp\.down_proj\.weight "
        r"while it is stepped \(32772 bytes: its optimizer state and step counter, .* and AdamW's "
        r"temporaries\), nor one row of it \(1028 bytes\), the smallest chunk it is stepped in; raise it to at "
        r"least 1028 bytes$",
    ):
        fit(GRASSStrategy(offload="cpu", max_resident_bytes=1000), module=module)
    assert all(torch.equal(before[name], p) for name, p in module.state_dict().items())


def test_active_layers_stay_resident_for_their_window_and_move_only_at_resamples():
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=3, seed=1)
    _, trainer = fit(GRASSStrategy(offload="cpu"), max_steps=15, callback=callback)
    windows = [record["active_layers"] for record in callback.history]
    fetched = 0
    for index, layers in enumerate(windows[1:-1], start=1):  # the last draw, at the last step, never trains
        seen_before = {layer for window in windows[: index - 1] for layer in window}
        fetched += len([layer for layer in layers if layer not in windows[index - 1] and layer in seen_before])
    stats = trainer.strategy.offload_stats
    assert len(windows) == 6 and fetched > 0, "some layers came back after a window away"
    assert stats["bytes_to_device"] == fetched * LAYER_STATE_BYTES
    assert stats["backing_bytes"] == 4 * LAYER_HOST_BYTES, "one host buffer, sized up front for every layer"


def test_offload_always_on_moves_embedding_and_head_states_off_the_device(tmp_path):
    budget = "64KiB"  # less than the active layers and the always-on modules need: everything offloaded streams
    _, resident = fit(GRASSStrategy(offload="disk", offload_dir=tmp_path, max_resident_bytes=budget))
    strategy = GRASSStrategy(offload="disk", offload_dir=tmp_path, max_resident_bytes=budget, offload_always_on=True)
    module, offloaded = fit(strategy)
    assert module.model.lm_head.weight not in offloaded.optimizers[0].state
    assert any(p is module.model.lm_head.weight for p in offloaded.strategy._offloaded.store.params)
    assert resident.optimizers[0].state, "without offload_always_on the head's state stays resident"
    assert offloaded.strategy.offload_stats["peak_resident_bytes"] <= 64 * 2**10


def test_strategy_without_the_callback_trains_like_single_device():
    plain_module = TinyCausalLM()
    make_trainer(max_steps=4, strategy=SingleDeviceStrategy("cpu")).fit(plain_module, token_batches())
    module = TinyCausalLM()
    trainer = make_trainer(max_steps=4, strategy="grass_offload_disk")
    trainer.fit(module, token_batches())
    assert same_weights(plain_module, module)
    assert not isinstance(trainer.optimizers[0], OffloadedOptimizer)


def test_without_a_tier_offload_stats_count_every_resident_state():
    # offload="none" keeps the states of layers that leave the active set: they all stay resident, so the last
    # count is the peak, and it is every state the optimizer holds at the end.
    module, trainer = fit(GRASSStrategy(offload="none"))
    stats = trainer.strategy.offload_stats
    with_state = [p for p in module.parameters() if p in trainer.optimizers[0].state]
    assert sorted(stats) == ["peak_resident_bytes", "resident_bytes"]
    assert stats["resident_bytes"] == stats["peak_resident_bytes"] == adamw_state_bytes(with_state)
    assert len(with_state) >= 2 * 9 + 3, "two layers of 9 tensors and the 3 always-on tensors at least"


def test_offload_stats_are_logged(tmp_path):
    _, trainer = fit(GRASSStrategy(offload="cpu"), logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=2)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as metrics:
        rows = [row for row in csv.DictReader(metrics) if row.get("offload/bytes_to_device")]
    assert [int(row["step"]) for row in rows] == [2, 4, 6, 8]
    assert float(rows[-1]["offload/bytes_to_device"]) == trainer.strategy.offload_stats["bytes_to_device"]


def offload_columns(folder):
    """The offload metrics in the CSV logs under ``folder``."""
    columns = set()
    for path in folder.rglob("metrics.csv"):
        with open(path) as metrics:
            columns.update(name for name in next(csv.reader(metrics)) if name.startswith("offload/"))
    return columns


@pytest.mark.parametrize("logging_off", ["log_every_n_steps=0", "barebones=True"])
def test_with_logging_turned_off_the_strategy_logs_nothing_and_trains_as_with_it_on(tmp_path, logging_off):
    logger = CSVLogger(tmp_path, name="on")
    reference, logged = fit(GRASSStrategy(offload="cpu"), max_steps=4, logger=logger, log_every_n_steps=2)
    assert "offload/bytes_to_backing" in offload_columns(tmp_path / "on")
    if logging_off == "barebones=True":
        settings = dict(barebones=True)
    else:
        settings = dict(logger=CSVLogger(tmp_path, name="off"), log_every_n_steps=0)
    module, trainer = fit(GRASSStrategy(offload="cpu"), max_steps=4, **settings)
    assert trainer.global_step == 4
    assert same_weights(reference, module)
    stats = trainer.strategy.offload_stats
    assert stats == {**logged.strategy.offload_stats, "host_wait_seconds": stats["host_wait_seconds"]}
    assert offload_columns(tmp_path / "off") == set()


def _resumable_run(tmp_path, strategy, max_steps, resume_from=None, checkpoints=None):
    module = TinyCausalLM(weight_decay=0.1)
    callbacks = [GRASSCallback(probe_steps=2, sample_every=2, seed=0)]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(checkpoints, filename="{step}", every_n_train_steps=3, save_top_k=-1))
    trainer = make_trainer(
        max_steps=max_steps, strategy=strategy, callbacks=callbacks, enable_checkpointing=checkpoints is not None
    )
    trainer.fit(module, token_batches(num_batches=3), ckpt_path=resume_from)
    return module, trainer, callbacks[0]


def test_resume_with_the_disk_tier_is_bit_exact(tmp_path):
    disk = lambda: GRASSStrategy(offload="disk", offload_dir=tmp_path / "offload")  # noqa: E731
    full, _, full_callback = _resumable_run(tmp_path, disk(), 12, checkpoints=tmp_path / "ckpt")
    checkpoint = torch.load(tmp_path / "ckpt" / "step=6.ckpt", weights_only=False)
    saved = checkpoint["optimizer_states"][0]["state"]
    assert len(saved) > 2 * 9 + 3, "the checkpoint holds offloaded layers' states too"
    assert all(t.device.type == "cpu" for s in saved.values() for t in s.values() if torch.is_tensor(t))

    resumed, _, callback = _resumable_run(tmp_path, disk(), 12, resume_from=tmp_path / "ckpt" / "step=6.ckpt")
    assert same_weights(full, resumed)
    assert callback.history == full_callback.history
    # The strategy's teardown freed the tier; compare the states at the last checkpoint of each run instead.
    ckpt_dir = tmp_path / "ckpt2"
    _resumable_run(tmp_path, disk(), 12, resume_from=tmp_path / "ckpt" / "step=6.ckpt", checkpoints=ckpt_dir)
    final_full = torch.load(tmp_path / "ckpt" / "step=12.ckpt", weights_only=False)["optimizer_states"][0]
    final_resumed = torch.load(ckpt_dir / "step=12.ckpt", weights_only=False)["optimizer_states"][0]
    assert final_full["state"].keys() == final_resumed["state"].keys()
    for index, state in final_full["state"].items():
        assert all(torch.equal(v, final_resumed["state"][index][k]) for k, v in state.items()), index


def test_checkpoint_after_teardown_is_refused_with_a_reason(tmp_path):
    _, trainer = fit(GRASSStrategy(offload="disk", offload_dir=tmp_path))
    with pytest.raises(RuntimeError, match="freed when training ended"):
        trainer.save_checkpoint(tmp_path / "late.ckpt")
    assert not (tmp_path / "late.ckpt").exists()


def test_a_step_the_grad_scaler_skips_leaves_offloaded_states_untouched(tmp_path):
    snapshots = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[("before", trainer.global_step)] = copy.deepcopy(trainer.optimizers[0].state_dict())

        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 4:
                next(p for p in pl_module.model.model.layers[0].parameters() if p.grad is not None).grad[0] = float(
                    "inf"
                )

        def on_train_batch_end(self, trainer, *args):
            snapshots[("after", trainer.global_step)] = copy.deepcopy(trainer.optimizers[0].state_dict())

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    callback = GRASSCallback(mode="fixed", fixed_layers=[0, 2])
    strategy = GRASSStrategy(offload="disk", offload_dir=tmp_path)
    fit(strategy, max_steps=6, callback=callback, plugins=[plugin], extra_callbacks=[Snapshot()])
    before, after = snapshots[("before", 4)]["state"], snapshots[("after", 5)]["state"]
    assert before.keys() == after.keys() and before
    for index, state in before.items():
        assert all(torch.equal(v, after[index][k]) for k, v in state.items()), "skipped step changed a state"
    changed = snapshots[("after", 6)]["state"]
    assert any(not torch.equal(v, changed[i][k]) for i, s in after.items() for k, v in s.items())


def test_hydra_target_instantiates_the_strategy(tmp_path):
    from hydra.utils import instantiate

    strategy = instantiate(
        {
            "_target_": "lightning_grass.GRASSStrategy",
            "offload": "disk",
            "offload_dir": str(tmp_path),
            "max_resident_bytes": "2MiB",
        }
    )
    assert isinstance(strategy, GRASSStrategy)
    assert (strategy.offload, strategy.max_resident_bytes) == ("disk", 2 * 2**20)
    fit(strategy, max_steps=2)


@pytest.mark.parametrize(
    "strategy_args",
    [
        ["--trainer.strategy=grass"],
        [
            "--trainer.strategy.class_path=lightning_grass.GRASSStrategy",
            "--trainer.strategy.init_args.offload=disk",
            "--trainer.strategy.init_args.max_resident_bytes=2MiB",
        ],
    ],
    ids=["registered-name", "class_path"],
)
def test_lightning_cli_builds_the_strategy(strategy_args):
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(TinyCausalLM, run=False, args=["--trainer.accelerator=cpu", *strategy_args])
    assert isinstance(cli.trainer.strategy, GRASSStrategy)
    if "class_path" in strategy_args[0]:
        assert (cli.trainer.strategy.offload, cli.trainer.strategy.max_resident_bytes) == ("disk", 2 * 2**20)


def test_package_exports():
    assert lightning_grass.GRASSStrategy is GRASSStrategy


def test_the_strategy_without_the_callback_says_so_once(caplog):
    with caplog.at_level(logging.INFO):
        make_trainer(max_steps=3, strategy="grass").fit(TinyCausalLM(), token_batches())
    notices = [r.getMessage() for r in caplog.records if "used without GRASSCallback" in r.getMessage()]
    assert notices == [
        "GRASSStrategy is used without GRASSCallback: every parameter trains at every step and no "
        "optimizer state is offloaded, as with Lightning's own strategy"
    ]


def test_disk_tier_on_a_gpu_needs_an_offload_dir():
    strategy = GRASSStrategy(offload="disk")
    strategy.parallel_devices = [torch.device("cuda", 0)]
    with pytest.raises(ValueError, match=r"offload='disk' on cuda:0 needs offload_dir: .* Pass offload_dir="):
        strategy.on_layer_map(None, None)


def test_a_full_offload_dir_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    module = TinyCausalLM()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    with pytest.raises(ValueError) as refused:
        fit(GRASSStrategy(offload="disk", offload_dir=tmp_path), module=module)
    assert str(refused.value) == (
        f"offload_dir='{tmp_path}' has 1000 B free, but the offloaded optimizer states need about 290.14 KiB once "
        "every offloaded tensor has been trained; free space there or choose another offload_dir"
    )
    assert all(torch.equal(before[name], p) for name, p in module.named_parameters())
    assert list(tmp_path.iterdir()) == [], "the refused run left no folder behind"
