"""``GRASSStrategy``: one-device training that keeps only the updated layers' optimizer states on the device."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_grass.errors import SettingValueError
from lightning_grass.strategies.layerwise_offload import LayerwiseOffloadMixin


class GRASSStrategy(LayerwiseOffloadMixin, SingleDeviceStrategy):
    """Single-device strategy that offloads each layer's optimizer state and steps the optimizer layer by layer.

    With :class:`~lightning_grass.GRASSCallback`, only the active layers get gradients. This strategy keeps
    every layer's optimizer state in a backing tier and brings a layer's state to the device only for its
    update: the optimizer step runs layer by layer, fetching layer ``i + 1`` and writing back layer ``i - 1``
    while layer ``i`` is updated. The first active layer's fetch starts when the step is entered, so it
    overlaps the forward and backward pass. States of deactivated layers are kept, so a layer drawn again
    resumes its moments. Results are bit-identical to the same optimizer without offload.

    Without the callback it trains like ``SingleDeviceStrategy``.

    Tiers (``offload``):

    - ``"none"``: every state stays resident, as in plain training (but states of inactive layers are kept).
    - ``"cpu"``: host memory. On CUDA the buffers are pinned and copies run on a dedicated stream; on a CPU
      device this only exercises the pipeline.
    - ``"disk"``: one file per layer under ``offload_dir``, read and written by a background thread, like
      ZeRO-Infinity's NVMe tier. For CPU training, and for GPU users short of host RAM.
    - ``"auto"`` (default): ``"cpu"`` on CUDA, ``"none"`` on a CPU device.

    Args:
        offload: ``"auto"``, ``"none"``, ``"cpu"`` or ``"disk"``.
        offload_dir: Folder for the disk tier (a subfolder per run is created and deleted at teardown);
            ``None`` uses the system temp folder.
        max_resident_layers: Layers whose states may sit on the device at once, transfers in flight
            included. 2 (default) overlaps each update with the next fetch; 3 also overlaps the write-back.
        offload_always_on: Also offload the embeddings, LM head and final norm (stepped every step, so they
            are fetched and written back every step); by default their states stay resident.
        device: The device; ``None`` takes the one the Trainer's accelerator and ``devices`` select.
        accelerator: Passed to ``SingleDeviceStrategy``.
        checkpoint_io: Passed to ``SingleDeviceStrategy``.
        precision_plugin: Passed to ``SingleDeviceStrategy``.

    Example::

        import lightning as L
        import lightning_grass  # registers strategy="grass"

        trainer = L.Trainer(strategy="grass", callbacks=[lightning_grass.GRASSCallback(n_active=2)])
    """

    strategy_name = "grass"

    def __init__(
        self,
        offload: str = "auto",
        offload_dir: str | os.PathLike | None = None,
        max_resident_layers: int = 2,
        offload_always_on: bool = False,
        device: str | torch.device | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._init_offload(offload, offload_dir, max_resident_layers, offload_always_on)
        self._device_given = device is not None
        self._parallel_devices: list[torch.device] | None = None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The devices the Trainer selected; Lightning fills this in, and the first becomes the root device."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        self._parallel_devices = devices
        if not devices or self._device_given:
            return
        if len(devices) > 1:
            raise SettingValueError(
                f"strategy='{self.strategy_name}' trains on one device, but the Trainer selected {len(devices)} "
                f"({', '.join(map(str, devices))}); pass devices=1"
            )
        self._root_device = devices[0]

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="GRASS layer-wise optimizer-state offload, one device", override=True
        )
        strategy_registry.register(
            "grass_offload_cpu",
            cls,
            description="GRASS with optimizer states in (pinned) host memory",
            override=True,
            offload="cpu",
        )
        strategy_registry.register(
            "grass_offload_disk",
            cls,
            description="GRASS with optimizer states in files, read and written by a background thread",
            override=True,
            offload="disk",
        )
