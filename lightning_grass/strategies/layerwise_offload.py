"""``LayerwiseOffloadMixin``: what GRASS's single-device and DDP strategies share about optimizer-state offload."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.layer_discovery import ALWAYS_ON_GROUPS, LayerMap
from lightning_grass.offload import DiskTier, HostTier, LayerStateStore, LayerwiseOptimizer, optimizer_state_bytes

#: Accepted values of ``offload``.
OFFLOAD_TIERS = ("auto", "none", "cpu", "disk")


class LayerwiseOffloadMixin:
    """Layer-wise optimizer-state offload for a Lightning strategy; mixed in before the strategy class.

    It answers :class:`~lightning_grass.ActiveLayerListener`: on :meth:`on_layer_map` it groups each layer's
    parameters and wraps the optimizer in a :class:`~lightning_grass.offload.LayerwiseOptimizer`, and
    :meth:`on_active_layers` sets the update (and prefetch) order.

    Lightning moves every optimizer state to the device twice: at the end of ``setup()`` and after loading a
    checkpoint. Only the second would undo the offload, so only :meth:`load_optimizer_state_dict` is
    replaced, and both strategies keep their base class's ``setup()``. At setup the optimizer has just been
    built by ``configure_optimizers``: it holds no state yet, or state its constructor made next to the
    parameters, which are already on the device. The states are created later, by the first step, or
    loaded from a checkpoint, and the state store places them from then on.
    """

    def _init_offload(
        self,
        offload: str,
        offload_dir: str | os.PathLike | None,
        max_resident_layers: int,
        offload_always_on: bool,
    ) -> None:
        if offload not in OFFLOAD_TIERS:
            raise SettingValueError(f"offload={offload!r} is not supported; use one of {OFFLOAD_TIERS}")
        if isinstance(max_resident_layers, bool) or not isinstance(max_resident_layers, int):
            raise SettingTypeError(f"max_resident_layers={max_resident_layers!r} must be an integer >= 1")
        if max_resident_layers < 1:
            raise SettingValueError(f"max_resident_layers={max_resident_layers!r} must be an integer >= 1")
        self.offload = offload
        self.offload_dir = offload_dir
        self.max_resident_layers = max_resident_layers
        self.offload_always_on = offload_always_on
        self._layerwise: LayerwiseOptimizer | None = None
        self._always_on_group: int | None = None
        self._layer_map: LayerMap | None = None
        self._stats: dict[str, float] = {}
        self._noticed_no_callback = False

    @property
    def offload_tier(self) -> str:
        """The tier in use: ``offload`` with ``"auto"`` resolved for the root device."""
        if self.offload == "auto":
            return "cpu" if self.root_device.type == "cuda" else "none"
        return self.offload

    @property
    def offload_stats(self) -> dict[str, float]:
        """Residency and transfer counters of the offload tier (kept after fit); empty when nothing is offloaded.

        Keys: ``resident_bytes`` and ``peak_resident_bytes`` (optimizer state on the device, layers in slots
        plus always-resident modules), ``resident_layers`` and ``peak_resident_layers``, ``backing_bytes``,
        ``bytes_to_device``, ``bytes_to_backing``, and ``wait_seconds`` (time the step blocked on transfers).
        """
        return dict(self._stats)

    def on_layer_map(self, layer_map: LayerMap) -> None:
        """Group each layer's parameters and wrap the optimizer so its states are offloaded layer by layer."""
        self._layer_map = layer_map
        self._close_store()
        if self.offload_tier == "disk" and self.root_device.type != "cpu" and self.offload_dir is None:
            raise SettingValueError(
                f"offload='disk' on {self.root_device} needs offload_dir: GPU runs offload gigabytes of state, and "
                "the system temp folder is often small or held in RAM. Pass offload_dir='/path/on/a/large/disk'"
            )
        if self.offload_tier == "none" or len(self.optimizers) != 1:
            return
        optimizer = self.optimizers[0]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        groups = [
            [p for p in layer_map.layer_parameters(i) if id(p) in in_optimizer] for i in range(layer_map.num_layers)
        ]
        self._always_on_group = None
        if self.offload_always_on:
            grouped = {id(p) for params in groups for p in params}
            always_on = {
                id(p): p
                for name in ALWAYS_ON_GROUPS
                for p in layer_map.group_parameters(name)
                if id(p) in in_optimizer and id(p) not in grouped
            }
            self._always_on_group = len(groups)
            groups.append(list(always_on.values()))
        if self.offload_tier == "disk":
            tier = DiskTier(self.offload_dir)
            _check_free_space(tier.directory, groups)
        else:
            tier = HostTier(self.root_device)
        store = LayerStateStore(optimizer, groups, tier, self.max_resident_layers)
        self._layerwise = LayerwiseOptimizer(optimizer, store)
        self._stats = store.stats
        self.optimizers = [self._layerwise]
        rank_zero_info(
            f"GRASSStrategy: optimizer states offloaded to {self.offload_tier!r} layer by layer, at most "
            f"{self.max_resident_layers} layers resident on {self.root_device}"
        )

    def on_active_layers(self, active_layers: Sequence[int]) -> None:
        """Update order for the next steps: the active layers ascending, then the always-on group if offloaded."""
        if self._layerwise is not None:
            order = list(active_layers)
            if self._always_on_group is not None:
                order.append(self._always_on_group)
            self._layerwise.set_order(order)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        layerwise = self._layerwise
        if self._layer_map is None and not self._noticed_no_callback:
            self._noticed_no_callback = True
            rank_zero_info(
                f"{type(self).__name__} is used without GRASSCallback: every parameter trains at every step and no "
                "optimizer state is offloaded, as with Lightning's own strategy"
            )
        if layerwise is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        layerwise.prefetch_first()
        try:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            layerwise.store.discard_unused()
            layerwise.store.set_always_resident_bytes(optimizer_state_bytes(layerwise.optimizer))
            self._log_stats()

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Strategy.load_optimizer_state_dict moves every state to the device after loading; a layer-wise
        # optimizer loads offloaded states straight into the backing tier instead.
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)
            if not isinstance(optimizer, LayerwiseOptimizer):
                _optimizer_to_device(optimizer, self.root_device)

    @override
    def teardown(self) -> None:
        self._close_store()
        super().teardown()

    def _close_store(self) -> None:
        if self._layerwise is not None:
            self._layerwise.store.close()
            self._layerwise = None

    def _log_stats(self) -> None:
        trainer = self.lightning_module.trainer
        step = trainer.global_step + 1
        if step % trainer.log_every_n_steps:
            return
        metrics = {f"offload/{name}": float(value) for name, value in self.offload_stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _check_free_space(directory: os.PathLike, groups: list[list[torch.nn.Parameter]]) -> None:
    """Refuse a disk tier that cannot hold two Adam-sized moments for every offloaded parameter."""
    needed = 2 * sum(p.numel() * p.element_size() for params in groups for p in params)
    free = shutil.disk_usage(directory).free
    if free < needed:
        shutil.rmtree(directory, ignore_errors=True)
        raise SettingValueError(
            f"offload_dir={str(Path(directory).parent)!r} has {free / 2**30:.2f} GiB free, but the layers' optimizer "
            f"states need about {needed / 2**30:.2f} GiB (two moments per parameter); free space or choose "
            "another offload_dir"
        )
