"""``LayerwiseOffloadMixin``: what GRASS's single-device, DDP and FSDP2 strategies share about optimizer state."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grass.byte_size import format_bytes
from lightning_grass.errors import SettingValueError
from lightning_grass.offload import (
    DiskTier,
    HostTier,
    OffloadedOptimizer,
    TensorStateStore,
    expected_state_tensors,
    needs_master,
    optimizer_state_bytes,
)
from lightning_grass.offload.offloaded_optimizer import check_offloadable
from lightning_grass.offload.plan import OffloadPlan, plan_offload
from lightning_grass.offload.settings import OffloadSettings
from lightning_grass.persistence.atomic_checkpoint_io import AtomicCheckpointIO
from lightning_grass.sampling.layer_discovery import ALWAYS_ON_GROUPS, LayerMap
from lightning_grass.sampling.sampling_units import SamplingUnits


class LayerwiseOffloadMixin:
    """Optimizer-state offload and fp32 master weights for a Lightning strategy; mixed in before its class.

    At ``setup()`` (fit only) it refuses float16 weights and, when parameters are half precision, wraps the
    optimizer in an :class:`~lightning_grass.offload.OffloadedOptimizer` that steps fp32 masters. It answers
    :class:`~lightning_grass.ActiveLayerListener`: :meth:`on_layer_map` adds a
    :class:`~lightning_grass.offload.TensorStateStore` over the sampled units' parameters (layers, or modules),
    and :meth:`on_active_units` tells it which of them the next steps update.

    Lightning moves every optimizer state to the device at the end of ``setup()`` and after loading a
    checkpoint. The first moves nothing: the optimizer has just been built and holds no state yet (or state
    its constructor made next to the parameters, already on the device), so ``setup()`` stays Lightning's
    and only adds the wrapping. The second would undo the offload, so :meth:`load_optimizer_state_dict`
    loads offloaded states straight into the backing tier instead.

    Checkpoints are written by :class:`~lightning_grass.AtomicCheckpointIO` unless another ``checkpoint_io`` is
    given, so a save that fails on any filesystem leaves the previous checkpoint loadable.

    :class:`~lightning_grass.GRASSFSDPStrategy` replaces ``setup()`` (it shards the model first, then refuses
    float16 and wraps the optimizer as here) and the checkpoint loading (sharded folders, through torch's
    distributed checkpointing, which writes them without ``checkpoint_io``); the rest is this class's.
    """

    @property
    def checkpoint_io(self) -> CheckpointIO:
        """The checkpoint plugin: :class:`~lightning_grass.AtomicCheckpointIO` unless one was given."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO | None) -> None:
        self._checkpoint_io = io

    def _init_offload(
        self,
        offload: str,
        offload_dir: str | os.PathLike | None,
        max_resident_bytes: int | str | None,
        offload_always_on: bool,
        master_weights: bool,
        overlap: bool,
    ) -> None:
        settings = OffloadSettings.validated(
            offload, offload_dir, max_resident_bytes, offload_always_on, master_weights, overlap
        )
        self.offload = settings.offload
        self.offload_dir = settings.offload_dir
        self.max_resident_bytes = settings.max_resident_bytes
        self.offload_always_on = settings.offload_always_on
        self.master_weights = settings.master_weights
        self.overlap = settings.overlap
        self._offloaded: OffloadedOptimizer | None = None
        self._plan: OffloadPlan | None = None
        self._layer_map: LayerMap | None = None
        self._stats: dict[str, float] = {}
        self._noticed_no_callback = False

    @property
    def offload_tier(self) -> str:
        """The tier in use. ``"auto"`` is ``"cpu"`` on CUDA or with ``max_resident_bytes``, else ``"none"``."""
        if self.offload == "auto":
            return "cpu" if self.root_device.type == "cuda" or self.max_resident_bytes is not None else "none"
        return self.offload

    @property
    def offload_stats(self) -> dict[str, float]:
        """Residency and transfer counters of the optimizer state on the device (kept after fit); empty before a step.

        Without a tier (``offload="none"``, or no ``GRASSCallback``) only ``resident_bytes`` and
        ``peak_resident_bytes`` are counted: every state (and master) in ``optimizer.state`` after each step.
        With one, the keys are ``resident_bytes`` and ``peak_resident_bytes`` (optimizer state and masters on
        the device: offloaded tensors being fetched, resident, stepped (with the step's master gradient and
        temporaries) or written back, plus the states of the parameters the store does not hold: the always-on
        modules' unless ``offload_always_on``, and those an ``add_param_group()`` added after the store was built),
        ``resident_tensors`` and ``peak_resident_tensors`` (offloaded tensors holding device memory),
        ``backing_bytes``, ``bytes_to_device``, ``bytes_to_backing``, and ``host_wait_seconds`` (time the host
        blocked on transfers: write-backs, and fetches on the CPU and from disk; on CUDA a fetch makes the
        compute stream wait on the device, which is not in it).
        """
        return dict(self._stats)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            refuse_float16(self.lightning_module, self.precision_plugin)
        super().setup(trainer)
        if fitting:
            self._wrap_optimizer()

    def on_layer_map(self, layer_map: LayerMap, units: SamplingUnits) -> None:
        """Offload the units' optimizer states (per tensor), and the always-on modules' if asked."""
        self._layer_map = layer_map
        if self.offload_tier == "disk" and self.root_device.type != "cpu" and self.offload_dir is None:
            raise SettingValueError(
                f"offload='disk' on {self.root_device} needs offload_dir: GPU runs offload gigabytes of state, and "
                "the system temp folder is often small or held in RAM. Pass offload_dir='/path/on/a/large/disk'"
            )
        self._wrap_optimizer(layer_map, units)

    def on_active_units(self, active_units: Sequence[int]) -> None:
        """The active units' tensors, then the always-on ones if offloaded, are what the next steps update."""
        if self._offloaded is not None and self._plan is not None:
            self._offloaded.set_active(self._plan.active_units(active_units))

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        offloaded = self._offloaded
        if self._layer_map is None and not self._noticed_no_callback:
            self._noticed_no_callback = True
            masters = " (half-precision parameters are still stepped on fp32 masters)" if offloaded else ""
            rank_zero_info(
                f"{type(self).__name__} is used without GRASSCallback: every parameter trains at every step and no "
                f"optimizer state is offloaded, as with Lightning's own strategy{masters}"
            )
        _refuse_overflowing_learning_rates(optimizer)
        if offloaded is not None:
            offloaded.prefetch()
        try:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            if offloaded is not None and self._plan is not None:
                offloaded.count_unmanaged_states()
            else:
                self._count_resident_states()
            self._log_stats()

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Strategy.load_optimizer_state_dict moves every state to the device after loading; the offloaded
        # optimizer loads offloaded states straight into the backing tier instead. As there, a checkpoint may hold
        # fewer states than there are optimizers (the others keep their fresh state), or more (ignored).
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=False):
            optimizer.load_state_dict(state)
            if not isinstance(optimizer, OffloadedOptimizer):
                _optimizer_to_device(optimizer, self.root_device)

    @override
    def teardown(self) -> None:
        # Every teardown frees the tier (a disk tier deletes its folder), failed runs' included: Lightning tears
        # down after an exception in a step, a StorageError from the tier, or KeyboardInterrupt. Closing never
        # raises a transfer's error again, and Lightning's own teardown runs whatever happens here.
        try:
            self._close_store()
        finally:
            super().teardown()

    def _wrap_optimizer(self, layer_map: LayerMap | None = None, units: SamplingUnits | None = None) -> None:
        """Wrap the user's optimizer for masters and, with a layer map and a tier, for offload; or unwrap it."""
        self._close_store()
        self._plan = None
        if len(self.optimizers) != 1:
            return
        inner = self.optimizers[0]
        if isinstance(inner, OffloadedOptimizer):
            inner = inner.optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        masters = [p for p in params if self.master_weights and needs_master(p)]
        store = None
        if layer_map is not None and units is not None and self.offload_tier != "none":
            check_offloadable(inner)
            self._plan = self._offload_plan(inner, layer_map, units, masters)
            store = self._build_store(inner, self._plan, masters)
        if store is None and not masters:
            self._offloaded = None
            self._stats = {}
            self.optimizers = [inner]
            return
        self._offloaded = OffloadedOptimizer(inner, store, masters)
        self._stats = self._offloaded.offload_stats
        self.optimizers = [self._offloaded]

    def _offload_plan(
        self, optimizer: Optimizer, layer_map: LayerMap, units: SamplingUnits, masters: list[nn.Parameter]
    ) -> OffloadPlan:
        """The plan over the units' parameters the optimizer holds, and the always-on ones if they are offloaded."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        layers = [[p for p in params if id(p) in in_optimizer] for params in units.parameters]
        always_on = []
        if self.offload_always_on:
            always_on = [
                p for name in ALWAYS_ON_GROUPS for p in layer_map.group_parameters(name) if id(p) in in_optimizer
            ]
        names = {id(p): name for name, p in self.lightning_module.named_parameters()}
        return plan_offload(optimizer, layers, always_on, masters, self.max_resident_bytes, names)

    def _build_store(self, optimizer: Optimizer, plan: OffloadPlan, masters: list[nn.Parameter]) -> TensorStateStore:
        sizes = [size.resident for size in plan.sizes]
        pinning = ""
        if self.offload_tier == "disk":
            tier = DiskTier(self.offload_dir, unit_bytes=sizes)
        else:
            mastered = {id(p) for p in masters}
            tensors = [expected_state_tensors(optimizer, p, id(p) in mastered) for p in plan.params]
            tier = HostTier(self.root_device, sizes, tensors)
            pinning = f"; host memory page-locked with {tier.pinning}" if tier.pinning else ""
        budget = "no bound" if self.max_resident_bytes is None else format_bytes(self.max_resident_bytes)
        chunked = plan.chunked_tensors()
        rank_zero_info(
            f"{type(self).__name__}: optimizer states of {plan.tensors} tensors offloaded to {self.offload_tier!r} "
            f"({format_bytes(sum(sizes))} once every layer has been trained); on {self.root_device}: {budget}"
            + pinning
            + (f"; {chunked} tensors larger than the budget stepped in chunks of rows" if chunked else "")
            + (f"; {len(masters)} half-precision tensors stepped on fp32 masters" if masters else "")
        )
        return TensorStateStore(optimizer, plan.params, tier, plan.max_resident_bytes, masters, self.overlap, plan.rows)

    def _close_store(self) -> None:
        if self._offloaded is not None:
            self._offloaded.close()

    def _count_resident_states(self) -> None:
        """Without a tier every state is resident: count ``optimizer.state``, and its peak."""
        resident = sum(optimizer_state_bytes(optimizer) for optimizer in self.optimizers)
        peak = max(resident, self._stats.get("peak_resident_bytes", 0))
        self._stats = {"resident_bytes": resident, "peak_resident_bytes": peak}

    def _log_stats(self) -> None:
        """Log the offload stats every ``log_every_n_steps`` steps; 0 (and ``barebones=True``) logs nothing."""
        trainer = self.lightning_module.trainer
        step = trainer.global_step + 1
        if trainer.log_every_n_steps == 0 or step % trainer.log_every_n_steps:
            return
        metrics = {f"offload/{name}": float(value) for name, value in self.offload_stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def refuse_float16(module: nn.Module, precision_plugin: Precision) -> None:
    """Refuse float16 training before the precision plugin converts the module and before any step.

    Without loss scaling, float16 gradients underflow and the update turns to NaN.

    Args:
        module: The LightningModule about to be trained.
        precision_plugin: The Trainer's precision plugin.

    Raises:
        SettingValueError: If a trainable parameter would train in float16.
    """
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if getattr(precision_plugin, "precision", None) == "16-true":
        half = [name for name, _ in trainable]
        source = "precision='16-true' converts"
    else:
        half = [name for name, p in trainable if p.dtype == torch.float16]
        source = "the model was loaded with"
    if half:
        raise SettingValueError(
            f"{len(half)} trainable parameters would train in float16 ({source} float16 weights, for example "
            f"{half[0]!r}). GRASS does not train float16 weights: without loss scaling their gradients underflow "
            "and the update turns to NaN. Use precision='bf16-true' (or load the model with dtype='bfloat16'), or "
            "precision='16-mixed' with float32 weights"
        )


def _refuse_overflowing_learning_rates(optimizer: Optimizer) -> None:
    """Refuse a learning rate whose update the optimizer cannot compute in float32, before the step.

    torch's optimizers scale each update by a Python number: ``lr`` (SGD), or ``lr / (1 - beta1 ** step)`` for
    the Adam family, which is largest at the first step, ``lr / (1 - beta1)``. Applied to float32 weights (or
    fp32 masters), a number beyond the largest float32 makes the step raise ``RuntimeError: value cannot be
    converted to type float without overflow`` (under Lightning's own strategies too): AdamW at ``lr=1e38`` (a
    first-step scale of 1e39). A learning rate whose scale fits is stepped as torch steps it, however large.
    The learning rate is read at every step, as a scheduler may raise it; the message names the scheduler's
    ``initial_lr`` too when it differs.

    Args:
        optimizer: The optimizer about to step.

    Raises:
        SettingValueError: If a parameter group's scale exceeds the largest float32; the message names its
            ``lr``.
    """
    largest = torch.finfo(torch.float32).max
    name = type(optimizer.optimizer if isinstance(optimizer, OffloadedOptimizer) else optimizer).__name__
    for index, group in enumerate(optimizer.param_groups):
        if "lr" not in group:
            continue
        lr = float(group["lr"])
        betas = group.get("betas")
        beta1 = float(betas[0]) if betas else 0.0
        divisor = 1 - beta1 if 0 < beta1 < 1 else 1.0
        if lr / divisor > largest:
            scale = f"its first update by lr / (1 - beta1) = {lr / divisor:.3g}" if divisor < 1 else "its updates by lr"
            initial = float(group.get("initial_lr", lr))
            where = f"parameter group {index}" + (f", scheduled from initial_lr={initial:g}" if initial != lr else "")
            raise SettingValueError(
                f"lr={lr:g} ({where}) is too large: {name} scales {scale}, beyond the largest "
                f"float32 ({largest:.3g}), so torch cannot compute the step. Use a learning rate below "
                f"{largest * divisor:.3g}; fine-tuning uses about 1e-5 to 1e-3"
            )
