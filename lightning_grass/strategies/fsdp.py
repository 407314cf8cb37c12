"""``GRASSFSDPStrategy``: GRASS on FSDP2 (``fully_shard`` per transformer block), through Lightning."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.offload import OffloadedOptimizer
from lightning_grass.offload.settings import check_sharded_precision
from lightning_grass.offload.sharded_tensors import ShardPlacement, local_part
from lightning_grass.offload.state_placement import resident_spec
from lightning_grass.sampling.layer_discovery import LayerMap, discover_layers
from lightning_grass.sampling.sampling_units import SamplingUnits
from lightning_grass.setting_checks import check_int, check_module_path
from lightning_grass.strategies.layerwise_offload import LayerwiseOffloadMixin, refuse_float16

log = logging.getLogger(__name__)


class GRASSFSDPStrategy(LayerwiseOffloadMixin, ModelParallelStrategy):
    """FSDP2 data-parallel sharding for GRASS: each rank holds 1/N of every weight, gradient and optimizer state.

    Built on Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (FSDP2, DTensor), with
    data-parallel sharding only: ``data_parallel_size`` defaults to the number of processes and
    ``tensor_parallel_size`` to 1, so ``Trainer(strategy="grass_fsdp", devices=N)`` shards over N ranks.

    - **Sharding.** A plain ``LightningModule`` needs no ``configure_model``: at setup, each transformer block
      found by :func:`~lightning_grass.discover_layers` gets its own ``fully_shard`` group, then every top-level
      submodule of the LightningModule that holds parameters (for a Hugging Face model, the causal LM itself,
      whose embeddings, head and final norm form the root group). One group per block is what lets GRASS
      toggle whole blocks: a frozen block gets no gradient and skips its reduce-scatter. A ``configure_model``
      that already applied ``fully_shard`` wins; the strategy then shards nothing.
    - **Lazy initialisation.** FSDP2 fixes each group's gradient dtypes when it first runs. A block frozen then
      cannot be trained later under a mixed-precision policy, so the strategy runs that initialisation at
      setup, while every block is still trainable, for every precision.
    - **Precision.** ``"32-true"``, ``"bf16-mixed"`` and ``"bf16-true"``. Under ``"bf16-mixed"`` the blocks are
      sharded with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` (unless ``mp_policy``
      is given): weights, moments and gradients stay float32 shards. Under ``"bf16-true"`` the shards are bf16
      and each is stepped on an fp32 master shard (``master_weights=True``), as with ``GRASSStrategy``.
      float16 weights are refused.
    - **Same layers on every rank.** ``GRASSCallback`` draws on rank 0 and broadcasts, as with ``grass_ddp``;
      MGN is read from the reduce-scattered gradient shards:
      :func:`~lightning_grass.sampling.importance.grouped_sq_norms` sums each rank's shard and all-reduces
      the per-layer sums, so it is the same on every rank.
    - **Offload.** The same engine as ``grass`` and ``grass_ddp``
      (:class:`~lightning_grass.offload.TensorStateStore`), over this rank's shards: every setting of
      :class:`~lightning_grass.GRASSStrategy` (tiers, ``max_resident_bytes`` per rank, ``offload_always_on``,
      overlap) means the same here, with sizes and budgets counted on the local shards.
    - **Checkpoints.** Sharded, with torch's distributed checkpointing (a folder with one file per rank plus
      Lightning's metadata). Offloaded states are read from the tier into the saved optimizer state, as
      ``DTensor`` shards around host tensors (never through the device), so a checkpoint always holds every
      state that exists. Resuming restores weights, optimizer states (offloaded ones loaded on the host,
      straight into the tier; ``step`` counters placed as the optimizer places them), the callback's sampler
      and the loops, bit-exactly.

    Launch it as any Lightning multi-process run: ``Trainer(strategy="grass_fsdp", devices=N, num_nodes=M)``,
    under ``torchrun`` or SLURM.

    Args:
        offload: ``"auto"``, ``"none"``, ``"cpu"`` or ``"disk"``, as for ``GRASSStrategy``.
        offload_dir: Folder for the disk tier; each rank creates its own subfolder.
        max_resident_bytes: Bound on this rank's offloaded state shards and masters on its device, as for
            ``GRASSStrategy``.
        offload_always_on: Also offload the embeddings', head's and final norm's state shards.
        master_weights: Step bf16 shards on fp32 master shards.
        overlap: Overlap transfers with compute.
        layers: Dotted path of the block container, overriding discovery. Give ``GRASSCallback`` the same
            ``layers``: a callback that samples another container is refused at fit start, naming both.
        mp_policy: FSDP2 mixed-precision policy for the groups the strategy shards; ``None`` picks one from the
            Trainer's precision.
        data_parallel_size: Ranks that shard the model; ``"auto"`` means every process.
        tensor_parallel_size: Must be 1 (``"auto"`` means 1): GRASS shards data-parallel only.
        **kwargs: Passed to ``ModelParallelStrategy`` (``process_group_backend``, ``timeout``).

    Raises:
        SettingValueError: For a ``data_parallel_size`` below 1, a tensor-parallel size other than 1,
            ``save_distributed_checkpoint=False``, an empty ``layers``, and the offload settings ``GRASSStrategy``
            refuses.
        SettingTypeError: For ``layers`` that is not a string, a ``data_parallel_size`` that is neither
            ``"auto"`` nor an int, an ``mp_policy`` of another type, and offload settings of the wrong type.
    """

    strategy_name = "grass_fsdp"

    def __init__(
        self,
        offload: str = "auto",
        offload_dir: str | os.PathLike | None = None,
        max_resident_bytes: int | str | None = None,
        offload_always_on: bool = False,
        master_weights: bool = True,
        overlap: bool = True,
        layers: str | None = None,
        mp_policy: MixedPrecisionPolicy | None = None,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int | str = "auto",
        **kwargs: Any,
    ) -> None:
        self._init_offload(offload, offload_dir, max_resident_bytes, offload_always_on, master_weights, overlap)
        check_module_path("layers", layers)
        check_int("data_parallel_size", data_parallel_size, minimum=1, or_word="auto")
        if isinstance(tensor_parallel_size, bool) or tensor_parallel_size not in ("auto", 1):
            raise SettingValueError(
                f"tensor_parallel_size={tensor_parallel_size!r} is not supported by grass_fsdp; it shards "
                "data-parallel only, so use 1 (or 'auto')"
            )
        if kwargs.get("save_distributed_checkpoint") is False:
            raise SettingValueError(
                "save_distributed_checkpoint=False is not supported by grass_fsdp; its checkpoints are sharded "
                "(one file per rank), so leave it True"
            )
        if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
            raise SettingTypeError(f"mp_policy={mp_policy!r} must be a torch.distributed.fsdp.MixedPrecisionPolicy")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1, **kwargs)
        self.layers = layers
        self.mp_policy = mp_policy
        self._checkpoint_path: Path | None = None
        self._sharded_path: str | None = None

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Fitting: Lightning restores callbacks after on_fit_start when this is True, and GRASSCallback reads its
        # saved draws at on_fit_start, so restore first; the sharded weights and optimizer states are loaded after
        # setup anyway, in load_optimizer_state_dict. validate, test and predict restore no optimizer: they
        # restore after setup, once the model is sharded, and load_model_state_dict loads the weights.
        return not self._fitting()

    def _fitting(self) -> bool:
        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        return trainer is None or trainer.state.fn == TrainerFn.FITTING

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # ModelParallelStrategy.setup requires a configure_model; this one shards a plain module itself.
        assert self.model is not None and self.accelerator is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        self.accelerator.setup(trainer)
        if fitting:
            refuse_float16(self.lightning_module, self.precision_plugin)
        check_sharded_precision(getattr(self.precision_plugin, "precision", "32-true"))
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self._shard(trainer)
        self.model_to_device()
        self._lazy_init()
        self.barrier()
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            self._wrap_optimizer()

    @override
    def on_layer_map(self, layer_map: LayerMap, units: SamplingUnits) -> None:
        """Offload the units' optimizer-state shards, as ``GRASSStrategy`` does.

        Modules (``GRASSCallback(unit="module")``) train inside one sharded block as whole blocks do: FSDP2 shards
        each parameter on its own (a ``DTensor`` per parameter), gives a frozen parameter no gradient and
        reduce-scatters only the parameters that have one, and each unshard copies ``requires_grad`` from the
        shard, so freezing part of a block between steps is exact.

        Raises:
            SettingValueError: If the callback samples another block container than the one sharded at setup.
        """
        if self._sharded_path is not None and layer_map.path != self._sharded_path:
            raise SettingValueError(
                f"GRASSFSDPStrategy sharded one group per block at '{self._sharded_path}', but GRASSCallback samples "
                f"the blocks at '{layer_map.path}': freezing a block of one container would leave the other's shard "
                f"groups running. Give both the same container: GRASSFSDPStrategy(layers='{layer_map.path}') and "
                f"GRASSCallback(layers='{layer_map.path}'), or neither"
            )
        super().on_layer_map(layer_map, units)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """This rank's optimizer state keyed by parameter name, offloaded shards included (read from the tier).

        Built from the optimizer's own ``state_dict()`` rather than with ``get_optimizer_state_dict``, which steps
        an optimizer with no state (during GRASS's probing phase, for example) to create one, and so would change
        it.
        """
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        state_dict = optimizer.state_dict()
        names = self._names_in_order(optimizer)
        return {
            "state": {names[index]: dict(state) for index, state in state_dict["state"].items()},
            "param_groups": [
                {**group, "params": [names[index] for index in group["params"]]} for group in state_dict["param_groups"]
            ],
        }

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Read Lightning's metadata now; the sharded weights and states load after setup."""
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            raise SettingValueError(
                f"ckpt_path={str(path)!r} is not a sharded checkpoint folder written by grass_fsdp (a folder with "
                f"{_METADATA_FILENAME} and torch.distributed.checkpoint files)"
            )
        self._checkpoint_path = path
        checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        checkpoint["optimizer_states"] = [None] * max(1, len(self.optimizers))
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Load the sharded weights for validate, test and predict.

        When fitting, the model is not sharded yet when Lightning calls this, and
        :meth:`load_optimizer_state_dict` loads the weights.
        """
        if not self._fitting():
            self._load_sharded_weights()

    def _load_sharded_weights(self) -> None:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        assert self._checkpoint_path is not None and self.model is not None
        model_state = {"state_dict": get_model_state_dict(self.model)}
        load(model_state, checkpoint_id=self._checkpoint_path)
        self.model.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Load the sharded weights, then the optimizer states, each read once into where it will live.

        The states of offloaded tensors are read into host tensors and go straight to the tier; the others are
        read into tensors on the device (``step`` counters where the optimizer keeps them).
        """
        from torch.distributed.checkpoint import FileSystemReader, load

        path = self._checkpoint_path
        assert path is not None and self.model is not None
        self._load_sharded_weights()
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            names = self._names_in_order(optimizer)
            loaded = {key: self._state_template(optimizer, names, metadata, f"{key}.state.")}
            load(loaded, checkpoint_id=path)
            position = {name: i for i, name in enumerate(names)}
            saved = loaded[key]
            first = 0
            groups = []
            for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
                params = list(range(first, first + len(group["params"])))
                groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": params})
                first += len(params)
            optimizer.load_state_dict(
                {"state": {position[name]: state for name, state in saved["state"].items()}, "param_groups": groups}
            )
        self._checkpoint_path = None

    def _state_template(
        self, optimizer: Optimizer, names: list[str], metadata: Mapping[str, Any], prefix: str
    ) -> dict[str, Any]:
        """Tensors for torch's distributed ``load`` to fill: on the host for offloaded states, else resident."""
        params = dict(zip(names, self._params_in_order(optimizer), strict=True))
        offloaded = set()
        mastered = set()
        if isinstance(optimizer, OffloadedOptimizer):
            offloaded = {id(p) for p in optimizer.offloaded_params()}
            mastered = {id(p) for p in params.values() if optimizer.is_mastered(p)}
        inner = optimizer.optimizer if isinstance(optimizer, OffloadedOptimizer) else optimizer
        template: dict[str, dict[str, Any]] = {}
        for key, meta in metadata.items():
            if not key.startswith(prefix):
                continue
            name, state_key = key[len(prefix) :].rsplit(".", 1)
            param = params[name]
            size = getattr(meta, "size", None)
            if size is None:
                template.setdefault(name, {})[state_key] = None  # a non-tensor value, filled in by load()
                continue
            placement = ShardPlacement.of(param) if tuple(size) == tuple(param.shape) else None
            shape = tuple(local_part(param).shape) if placement is not None else tuple(size)
            saved = torch.empty(shape, dtype=meta.properties.dtype, device="meta")
            device = resident_spec(inner, param, state_key, saved, id(param) in mastered).device
            if id(param) in offloaded:
                device = torch.device("cpu")
            local = torch.empty(shape, dtype=meta.properties.dtype, device=device)
            template.setdefault(name, {})[state_key] = local if placement is None else placement.around(local)
        groups = [{k: None for k in group if k != "params"} | {"params": None} for group in inner.param_groups]
        return {"state": template, "param_groups": groups}

    def _params_in_order(self, optimizer: Optimizer) -> list[nn.Parameter]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _names_in_order(self, optimizer: Optimizer) -> list[str]:
        """The names of ``optimizer``'s parameters, in the order of its state-dict indices."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [names[id(p)] for p in self._params_in_order(optimizer)]

    def _shard(self, trainer: pl.Trainer) -> None:
        """``fully_shard`` each block, then each top-level submodule holding parameters; unless already done."""
        module = self.lightning_module
        layer_map = discover_layers(module, self.layers)
        self._sharded_path = layer_map.path
        if any(isinstance(m, FSDPModule) for m in module.modules()):
            unsharded = [i for i, block in enumerate(layer_map.blocks) if not isinstance(block, FSDPModule)]
            if unsharded:
                rank_zero_warn(
                    f"configure_model applied fully_shard, but not to blocks {unsharded} of '{layer_map.path}': "
                    "GRASS toggles whole blocks, and a block that shares a shard group with others keeps that "
                    "group's reduce-scatter running while it is frozen. Shard each block on its own"
                )
            return
        direct = [name for name, _ in module.named_parameters(recurse=False)]
        if direct:
            raise SettingValueError(
                f"{type(module).__name__} holds parameters directly ({direct[:3]}); grass_fsdp shards the "
                "LightningModule's submodules, so move them into a submodule, or shard in configure_model"
            )
        policy = self.mp_policy or self._default_policy()
        mesh = self.device_mesh["data_parallel"]
        blocks = {id(b) for b in layer_map.blocks}
        for block in layer_map.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        for child in module.children():
            own = [p for m in child.modules() if id(m) not in blocks for p in m.parameters(recurse=False)]
            if own:
                fully_shard(child, mesh=mesh, mp_policy=policy)
        rank_zero_info(
            f"GRASSFSDPStrategy: {layer_map.num_layers} blocks at '{layer_map.path}' sharded one group each over "
            f"{mesh.size()} ranks"
        )

    def _default_policy(self) -> MixedPrecisionPolicy:
        if isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.precision == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def _lazy_init(self) -> None:
        """Run FSDP2's lazy initialisation of every root group now, while every block is still trainable.

        FSDP2 otherwise initialises at the first forward and fixes gradient dtypes from the parameters that are
        trainable then; under a mixed-precision policy a block frozen at that moment fails when trained later.
        """
        roots = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        nested = {id(sub) for root in roots for sub in root.modules() if sub is not root}
        for root in roots:
            if id(root) not in nested:
                root._get_fsdp_state()._lazy_init()  # torch has no public call for this; the first forward makes it
