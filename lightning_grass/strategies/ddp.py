"""``GRASSDDPStrategy``: GRASS on several devices and nodes with DDP, with the same optimizer-state offload."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.strategies import DDPStrategy

from lightning_grass.errors import SettingValueError
from lightning_grass.strategies.layerwise_offload import LayerwiseOffloadMixin
from lightning_grass.strategy_support import STATIC_GRAPH_REASON


class GRASSDDPStrategy(LayerwiseOffloadMixin, DDPStrategy):
    """``DDPStrategy`` for GRASS, with :class:`~lightning_grass.GRASSStrategy`'s offload tiers.

    GRASS freezes layers after DDP has wrapped the model (``GRASSCallback`` acts at fit start), so DDP's
    reducer knows every parameter; frozen layers then produce no gradient, which DDP accepts only with
    ``find_unused_parameters=True``, set here for you. ``static_graph=True`` is refused: it assumes the same
    parameters receive gradients at every step, and GRASS changes them at every resample. Every rank trains
    the same layers (rank 0 samples, then broadcasts), and MGN is read from the all-reduced gradients, so it
    is the same on every rank.

    Launch it as any Lightning DDP run: ``Trainer(strategy="grass_ddp", devices=N, num_nodes=M)``, under
    ``torchrun`` or SLURM.

    Args:
        offload: ``"auto"``, ``"none"``, ``"cpu"`` or ``"disk"``, as for ``GRASSStrategy``.
        offload_dir: Folder for the disk tier; each rank creates its own subfolder.
        max_resident_bytes: Bound on the offloaded states and masters on each device, as for ``GRASSStrategy``.
        offload_always_on: Also offload the embeddings', head's and final norm's states.
        master_weights: Step bf16 parameters on fp32 master weights, as for ``GRASSStrategy``.
        overlap: Overlap transfers with compute.
        **ddp_kwargs: Passed to ``DDPStrategy`` (and on to ``DistributedDataParallel``).

    Raises:
        SettingValueError: For ``static_graph=True`` or ``find_unused_parameters=False``, and for the offload
            settings ``GRASSStrategy`` refuses.
        SettingTypeError: For offload settings of the wrong type, as for ``GRASSStrategy``.
    """

    strategy_name = "grass_ddp"

    def __init__(
        self,
        offload: str = "auto",
        offload_dir: str | os.PathLike | None = None,
        max_resident_bytes: int | str | None = None,
        offload_always_on: bool = False,
        master_weights: bool = True,
        overlap: bool = True,
        **ddp_kwargs: Any,
    ) -> None:
        if ddp_kwargs.get("static_graph"):
            raise SettingValueError(STATIC_GRAPH_REASON)
        if ddp_kwargs.get("find_unused_parameters") is False:
            raise SettingValueError(
                "find_unused_parameters=False cannot be used with GRASS: frozen layers get no gradient, so DDP must "
                "look for unused parameters (GRASSDDPStrategy sets it to True)"
            )
        self._init_offload(offload, offload_dir, max_resident_bytes, offload_always_on, master_weights, overlap)
        super().__init__(**{**ddp_kwargs, "find_unused_parameters": True})
