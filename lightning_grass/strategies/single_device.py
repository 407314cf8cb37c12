"""``GRASSStrategy``: one-device training that keeps only the updated layers' optimizer states on the device."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_grass.errors import SettingValueError
from lightning_grass.strategies.layerwise_offload import LayerwiseOffloadMixin


class GRASSStrategy(LayerwiseOffloadMixin, SingleDeviceStrategy):
    """Single-device strategy that keeps only the updated tensors' optimizer states on the device.

    With :class:`~lightning_grass.GRASSCallback`, only the active layers get gradients. This strategy keeps
    every layer's optimizer state in a backing tier and brings a tensor's state to the device only while it
    is updated. States of deactivated layers are kept, so a layer drawn again resumes its moments. Results are
    bit-identical to the same optimizer without offload.

    - **Residency.** Without ``max_resident_bytes``, the active layers' states stay on the device for their
      whole window and move only when the callback draws other layers; they are fetched when the first step
      of the window is entered, overlapping forward and backward. With ``max_resident_bytes``, that bound
      holds at every instant, transfers in flight included. When the active states fit in it they behave as
      above; when they do not, they stream one tensor at a time: each tensor is fetched just before its update
      and written back after it, while the next one is being fetched. A tensor larger than the budget streams
      in chunks of rows (:mod:`~lightning_grass.offload.row_chunks`), bitwise the same for Adam, AdamW and SGD.
    - **Half precision.** Parameters in bf16 (``precision="bf16-true"``, or a model loaded in bf16) are
      stepped on fp32 master weights (``master_weights=True``): the optimizer updates the master with fp32
      moments and the bf16 gradient cast to fp32, and the master rounded to bf16 is written into the weight.
      Masters are part of the optimizer state: offloaded with it, resident only while their tensor is
      updated, and saved in checkpoints. float16 weights are refused before training (their updates turn to
      NaN without loss scaling); use ``bf16-true``, or ``16-mixed`` with float32 weights.

    Without the callback it trains like ``SingleDeviceStrategy`` (with masters for half-precision weights).

    Tiers (``offload``):

    - ``"none"``: every state stays resident, as in plain training (but states of inactive layers are kept).
    - ``"cpu"``: host memory. On CUDA the buffers are pinned and copies run on a dedicated stream; on a CPU
      device this only exercises the pipeline.
    - ``"disk"``: one file per tensor under ``offload_dir``, read and written by background threads, like
      ZeRO-Infinity's NVMe tier. For CPU training, and for GPU users short of host RAM.
    - ``"auto"`` (default): ``"cpu"`` on CUDA or when ``max_resident_bytes`` is set, ``"none"`` otherwise.

    Args:
        offload: ``"auto"``, ``"none"``, ``"cpu"`` or ``"disk"``.
        offload_dir: Folder for the disk tier (a subfolder per run is created and deleted at teardown);
            ``None`` uses the system temp folder.
        max_resident_bytes: Bound on the offloaded tensors' optimizer states and masters on the device,
            transfers in flight included: an int, or a string such as ``"512MiB"``. It must hold one row of
            every offloaded tensor while stepped (larger tensors stream in chunks of rows), and the largest
            tensor under an optimizer that is not elementwise; twice the largest lets every next fetch overlap
            the update. ``None`` (default) keeps every active layer's state resident.
        offload_always_on: Also offload the embeddings, LM head and final norm (stepped every step); by default
            their states stay resident.
        master_weights: Step bf16 parameters on fp32 master weights (default). ``False`` steps them in bf16,
            where updates below half a bf16 step are lost.
        overlap: Overlap transfers with compute (default). ``False`` copies synchronously; it exists to
            measure what overlap buys.
        device: The device; ``None`` takes the one the Trainer's accelerator and ``devices`` select.
        accelerator: Passed to ``SingleDeviceStrategy``.
        checkpoint_io: The checkpoint plugin; ``None`` is :class:`~lightning_grass.AtomicCheckpointIO`.
        precision_plugin: Passed to ``SingleDeviceStrategy``.

    Raises:
        SettingValueError: For an unknown ``offload``, a ``max_resident_bytes`` that is not a byte size of at
            least one byte (``"12 parsecs"``, ``0``), or a ``max_resident_bytes`` with ``offload="none"``.
        SettingTypeError: For an ``offload_dir`` that is not a path, a ``max_resident_bytes`` that is neither an
            int nor a string (``1.5``, ``float("nan")``), or a flag that is not a bool.

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
        max_resident_bytes: int | str | None = None,
        offload_always_on: bool = False,
        master_weights: bool = True,
        overlap: bool = True,
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
        self._init_offload(offload, offload_dir, max_resident_bytes, offload_always_on, master_weights, overlap)
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
