"""``estimate_memory``: the device memory GRASS needs for a model, before allocating it.

Build the model on the ``meta`` device and nothing is allocated, so a laptop can size LLaMA2-7B::

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import lightning_grass

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32))
    print(lightning_grass.estimate_memory(model, n_active=2, precision="bf16-true", max_resident_bytes="1GiB"))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_grass.byte_size import format_bytes
from lightning_grass.errors import SettingValueError
from lightning_grass.offload import needs_master
from lightning_grass.offload.plan import UnitBytes, plan_offload, unit_bytes
from lightning_grass.offload.settings import PRECISIONS, OffloadSettings, check_sharded_precision
from lightning_grass.sampling.config import check_n_active
from lightning_grass.sampling.layer_discovery import ALWAYS_ON_GROUPS, discover_layers
from lightning_grass.setting_checks import check_choice, check_flag, check_int, check_module_path


@dataclass(frozen=True)
class MemoryEstimate:
    """Device bytes of a GRASS run at its optimizer step, activations excluded.

    Attributes:
        weights: Every parameter, in the dtype it trains in.
        gradients: Gradients of what one step trains: the always-on modules and the ``n_active`` largest
            layers.
        master_weights: fp32 copies of the half-precision parameters whose optimizer state is on the device.
        optimizer_states: AdamW's two moments and its 4-byte step counter of the parameters whose state is on
            the device.
        step_workspace: What the step over offloaded tensors allocates beside their states (fp32 master
            gradients, AdamW's temporaries), which the offload holds on the device while it steps them; 0
            with ``offload="none"``.
    """

    weights: int
    gradients: int
    master_weights: int
    optimizer_states: int
    step_workspace: int

    @property
    def total(self) -> int:
        """The sum of the five parts."""
        return self.weights + self.gradients + self.master_weights + self.optimizer_states + self.step_workspace

    def __str__(self) -> str:
        parts = ("weights", "gradients", "master_weights", "optimizer_states", "step_workspace", "total")
        return ", ".join(f"{name} {format_bytes(getattr(self, name))}" for name in parts)


def estimate_memory(
    model: nn.Module,
    *,
    n_active: int,
    precision: str = "32-true",
    offload: str = "auto",
    max_resident_bytes: int | str | None = None,
    offload_always_on: bool = False,
    master_weights: bool = True,
    layers: str | None = None,
    shards: int = 1,
    foreach: bool = True,
    train_towers: bool = False,
) -> MemoryEstimate:
    """Device memory for fine-tuning ``model`` with ``GRASSCallback`` and ``GRASSStrategy``, activations excluded.

    Activations are left out because they depend on the batch size, the sequence length and activation
    checkpointing, none of which this function sees; add them from a measurement. Only parameter counts and
    dtypes are read, so a model on the ``meta`` device works.

    What it assumes: AdamW (two moments and a step counter per parameter); the callback's defaults, so the
    embeddings, LM head and final norm train at every step, and the towers (a vision-language model's vision
    encoder and projector) are frozen unless ``train_towers``; and the strategy's placement:

    - ``offload="none"`` keeps every layer's state on the device, because states of layers that leave the
      active set are kept, and in a long run every layer is drawn.
    - ``"cpu"`` and ``"disk"`` (and ``"auto"``, sized as on a GPU, where it means ``"cpu"``) keep the states
      of the ``n_active`` largest layers on the device, plus the always-on modules' unless
      ``offload_always_on``; the offload also holds what the step over its tensors allocates
      (``step_workspace``).

    What the offload holds is the strategy's own plan (:func:`~lightning_grass.offload.plan.plan_offload`: the
    same units, chunks, bytes and refusals), summed at its peak (:func:`~lightning_grass.offload.plan.held_at_peak`).
    Without ``max_resident_bytes``, or when the active units fit in it together while stepped, they are stepped
    together: their states, masters and workspaces add up. Otherwise they stream in update order (each active
    layer's tensors in registration order, then the always-on ones if offloaded; a tensor larger than the budget
    in chunks of rows), and the peak is the unit being stepped with the next ones' states that the store's
    lookahead fetches during its update. On a CPU run ``master_weights + optimizer_states + step_workspace`` is
    then ``offload_stats["peak_resident_bytes"]`` exactly, once the active layers have state; on CUDA, or with the
    disk tier, a write-back still in flight can hold one more tensor's state for a while, never beyond the budget.
    A budget that cannot hold one row of an offloaded tensor while it is stepped (with ``shards > 1``, the largest
    shard: shards are not chunked) is refused, as the strategy refuses it, with the bytes it needs.

    Left out, like activations: the workspace of the step over resident states (the always-on modules' unless
    offloaded, every layer's with ``offload="none"``), up to 4 bytes per element for master gradients plus one
    temporary (``foreach``) or two (for-loop) of the state's dtype.

    Module-wise sampling (``GRASSCallback(unit="module")``) draws modules up to the parameters of the ``n_active``
    largest layers, norms included, so its states and masters on the device stay within this estimate's without
    ``max_resident_bytes`` (the modules' states cost what their layers' cost per parameter), and within the budget
    with it.

    Half-precision parameters get fp32 master weights (``master_weights=True``), with fp32 moments. With
    ``n_active`` equal to the number of layers and ``offload="none"`` this is full fine-tuning.

    ``shards > 1`` sizes one rank of ``GRASSFSDPStrategy`` (``strategy="grass_fsdp"``) over that many ranks:
    each rank holds ``1/shards`` of every weight, gradient and state (rounded up per tensor), and its offload
    places, budgets and streams those shards as above. ``weights`` then also counts what FSDP2 all-gathers for
    compute: the root group (embeddings, head, final norm), which stays gathered through the step, and two
    blocks at once (the one computing and the one prefetched), in the compute dtype (bf16 under
    ``"bf16-mixed"`` and ``"bf16-true"``).

    Args:
        model: A Hugging Face causal LM or a module holding one, on any device, ``meta`` included.
        n_active: Layers trained at once (gamma).
        precision: Lightning's precision flag: ``"bf16-true"`` trains bf16 weights; ``"32-true"`` and the
            mixed precisions keep the model's own dtype.
        offload: ``"auto"``, ``"none"``, ``"cpu"`` or ``"disk"``, as for ``GRASSStrategy``.
        max_resident_bytes: The strategy's bound on offloaded states on the device.
        offload_always_on: Offload the embeddings', head's and final norm's states too.
        master_weights: Give half-precision parameters fp32 masters.
        layers: Dotted path of the block container, as for ``GRASSCallback``.
        shards: Ranks that shard the model with ``grass_fsdp``; 1 for ``grass`` and ``grass_ddp``.
        foreach: Whether AdamW takes its ``foreach`` path (torch's default for CUDA tensors: one temporary per
            element while stepped) or its for-loop (the default on the CPU: two), as ``step_workspace`` counts.
        train_towers: Whether the towers train at every step (``GRASSCallback(train_towers=True)``); frozen, they
            count in ``weights`` only.

    Returns:
        The estimate, in bytes.

    Raises:
        SettingValueError: For an unknown precision or offload, float16 training, ``n_active`` outside
            1 to the number of layers, ``shards < 1``, a ``max_resident_bytes`` with ``offload="none"`` or below
            what one row of an offloaded tensor needs while stepped (the largest shard with ``shards > 1``), or,
            with ``shards > 1``, a precision that ``grass_fsdp`` does not take.
        SettingTypeError: For an ``n_active`` or ``shards`` that is not an int, ``layers`` that is not a string, or
            an offload setting of the wrong type.
    """
    if precision == "16-true":
        raise SettingValueError("precision='16-true' is refused by GRASSStrategy; estimate 'bf16-true' instead")
    check_choice("precision", precision, tuple(PRECISIONS))
    settings = OffloadSettings.validated(offload, None, max_resident_bytes, offload_always_on, master_weights)
    check_int("shards", shards, minimum=1)
    if shards > 1:
        check_sharded_precision(precision, shards)
    check_flag("train_towers", train_towers)
    check_module_path("layers", layers)
    check_n_active(n_active)
    layer_map = discover_layers(model, layers)
    check_n_active(n_active, layer_map.num_layers)
    tier = "cpu" if offload == "auto" else offload
    dtype = PRECISIONS[precision]

    def weight_bytes(param: nn.Parameter) -> int:
        element = torch.empty((), dtype=dtype).element_size() if dtype else param.element_size()
        return -(-param.numel() // shards) * element

    per_layer = [_unique(layer_map.layer_parameters(i)) for i in range(layer_map.num_layers)]
    in_layers = {id(p) for params in per_layer for p in params}
    groups = [group for group in ALWAYS_ON_GROUPS if group != "towers" or train_towers]
    always_on = _unique(p for group in groups for p in layer_map.group_parameters(group) if id(p) not in in_layers)
    by_size = sorted(
        range(layer_map.num_layers), key=lambda i: sum(weight_bytes(p) for p in per_layer[i]), reverse=True
    )
    largest = sorted(by_size[:n_active])

    weights = sum(weight_bytes(p) for p in _unique(model.parameters()))
    if shards > 1:
        compute_size = 2 if precision in ("bf16-mixed", "bf16-true") else None
        gathered = always_on + [p for index in by_size[:2] for p in per_layer[index]]
        weights += sum(p.numel() * (compute_size or p.element_size()) for p in gathered)
    gradients = sum(weight_bytes(p) for p in always_on + [p for index in largest for p in per_layer[index]])

    # Stand-ins on the meta device, of the dtype each parameter trains in and of its shape (one rank's numel
    # under shards), held by an AdamW that is never stepped: the plan's arithmetic allocates nothing.
    stand_ins = {
        id(p): nn.Parameter(
            torch.empty(p.shape if shards == 1 else (-(-p.numel() // shards),), dtype=dtype or p.dtype, device="meta")
        )
        for p in always_on + [p for params in per_layer for p in params]
    }
    adamw = torch.optim.AdamW(list(stand_ins.values()), foreach=foreach)
    mastered = [s for s in stand_ins.values() if master_weights and needs_master(s)]
    with_master = {id(s) for s in mastered}

    def at_rest(params: list[nn.Parameter]) -> list[UnitBytes]:
        return [unit_bytes(adamw, stand_ins[id(p)], id(stand_ins[id(p)]) in with_master).at_rest() for p in params]

    if tier == "none":
        held = at_rest(always_on + [p for params in per_layer for p in params])
    else:
        plan = plan_offload(
            adamw,
            [[stand_ins[id(p)] for p in params] for params in per_layer],
            [stand_ins[id(p)] for p in always_on] if offload_always_on else [],
            mastered,
            settings.max_resident_bytes,
            {id(stand_ins[id(p)]): name for name, p in model.named_parameters() if id(p) in stand_ins},
            sharded=shards > 1,
        )
        held = plan.held_at_peak(plan.active_units(largest)) + ([] if offload_always_on else at_rest(always_on))
    return MemoryEstimate(
        weights,
        gradients,
        master_weights=sum(part.master for part in held),
        optimizer_states=sum(part.state for part in held),
        step_workspace=sum(part.workspace for part in held),
    )


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())
