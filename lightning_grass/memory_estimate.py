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

from lightning_grass.byte_size import format_bytes, parse_byte_size
from lightning_grass.errors import SettingValueError
from lightning_grass.layer_discovery import ALWAYS_ON_GROUPS, discover_layers
from lightning_grass.offload.state_bytes import ADAMW_MOMENTS
from lightning_grass.strategies.layerwise_offload import OFFLOAD_TIERS

#: Precisions ``grass_fsdp`` takes: its weights stay in their own dtype, sharded.
SHARDED_PRECISIONS = ("32-true", "32", "bf16-mixed")

#: Precisions and the weight dtype each trains in; ``None`` keeps the model's own dtype.
PRECISIONS: dict[str, torch.dtype | None] = {
    "32-true": None,
    "32": None,
    "bf16-mixed": None,
    "16-mixed": None,
    "bf16-true": torch.bfloat16,
    "64-true": torch.float64,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Device bytes of a GRASS run, activations excluded.

    Attributes:
        weights: Every parameter, in the dtype it trains in.
        gradients: Gradients of what one step trains: the always-on modules and the ``n_active`` largest
            layers.
        master_weights: fp32 copies of the half-precision parameters whose optimizer state is on the device.
        optimizer_states: AdamW's two moments of the parameters whose state is on the device.
    """

    weights: int
    gradients: int
    master_weights: int
    optimizer_states: int

    @property
    def total(self) -> int:
        """The sum of the four parts."""
        return self.weights + self.gradients + self.master_weights + self.optimizer_states

    def __str__(self) -> str:
        parts = ("weights", "gradients", "master_weights", "optimizer_states", "total")
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
) -> MemoryEstimate:
    """Device memory for fine-tuning ``model`` with ``GRASSCallback`` and ``GRASSStrategy``, activations excluded.

    Activations are left out because they depend on the batch size, the sequence length and activation
    checkpointing, none of which this function sees; add them from a measurement. Only parameter counts and
    dtypes are read, so a model on the ``meta`` device works.

    What it assumes: AdamW (two moments per parameter); the callback's defaults, so the embeddings, LM head
    and final norm train at every step; and the strategy's placement:

    - ``offload="none"`` keeps every layer's state on the device, because states of layers that leave the
      active set are kept, and in a long run every layer is drawn.
    - ``"cpu"`` and ``"disk"`` (and ``"auto"``, sized as on a GPU, where it means ``"cpu"``) keep the states
      of the ``n_active`` largest layers on the device, plus the always-on modules' unless
      ``offload_always_on``. ``max_resident_bytes`` caps what is offloaded and resident at that bound.

    Half-precision parameters get fp32 master weights (``master_weights=True``), with fp32 moments. With
    ``n_active`` equal to the number of layers and ``offload="none"`` this is full fine-tuning.

    ``shards > 1`` sizes one rank of ``GRASSFSDPStrategy`` (``strategy="grass_fsdp"``) over that many ranks:
    each rank holds ``1/shards`` of every weight, gradient and state (rounded up per tensor). ``weights`` then
    also counts what FSDP2 all-gathers for compute: the root group (embeddings, head, final norm), which stays
    gathered through the step, and two blocks at once (the one computing and the one prefetched), in the
    compute dtype (bf16 under ``"bf16-mixed"``). There, weights stay fp32 shards, so no master weights.

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

    Returns:
        The estimate, in bytes.

    Raises:
        SettingValueError: For an unknown precision or offload, float16 training, ``n_active`` outside
            1 to the number of layers, ``shards < 1``, or, with ``shards > 1``, a precision or a
            ``max_resident_bytes`` that ``grass_fsdp`` does not take.
    """
    if precision == "16-true":
        raise SettingValueError("precision='16-true' is refused by GRASSStrategy; estimate 'bf16-true' instead")
    if precision not in PRECISIONS:
        raise SettingValueError(f"precision={precision!r} is not supported; use one of {sorted(PRECISIONS)}")
    if offload not in OFFLOAD_TIERS:
        raise SettingValueError(f"offload={offload!r} is not supported; use one of {OFFLOAD_TIERS}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise SettingValueError(f"shards={shards!r} must be an int >= 1 (the ranks grass_fsdp shards over)")
    if shards > 1 and precision not in SHARDED_PRECISIONS:
        raise SettingValueError(
            f"precision={precision!r} is not supported by grass_fsdp (shards={shards}); use one of {SHARDED_PRECISIONS}"
        )
    if shards > 1 and max_resident_bytes is not None:
        raise SettingValueError(
            f"max_resident_bytes={max_resident_bytes!r} is not supported by grass_fsdp (shards={shards}): it moves "
            "whole state shards, without a byte budget"
        )
    layer_map = discover_layers(model, layers)
    if not 1 <= n_active <= layer_map.num_layers:
        raise SettingValueError(
            f"n_active={n_active} must be between 1 and the number of layers ({layer_map.num_layers})"
        )
    budget = None if max_resident_bytes is None else parse_byte_size(max_resident_bytes, "max_resident_bytes")
    dtype = PRECISIONS[precision]

    def numel(param: nn.Parameter) -> int:
        return -(-param.numel() // shards)

    def weight_bytes(param: nn.Parameter) -> int:
        return numel(param) * (torch.empty((), dtype=dtype).element_size() if dtype else param.element_size())

    def is_half(param: nn.Parameter) -> bool:
        return (dtype or param.dtype) in (torch.bfloat16, torch.float16)

    def state_and_master(params: list[nn.Parameter]) -> tuple[int, int]:
        states = masters = 0
        for p in params:
            mastered = master_weights and is_half(p)
            states += ADAMW_MOMENTS * (4 * numel(p) if mastered else weight_bytes(p))
            masters += 4 * numel(p) if mastered else 0
        return states, masters

    per_layer = [_unique(layer_map.layer_parameters(i)) for i in range(layer_map.num_layers)]
    in_layers = {id(p) for params in per_layer for p in params}
    always_on = _unique(p for group in ALWAYS_ON_GROUPS for p in layer_map.group_parameters(group))
    always_on = [p for p in always_on if id(p) not in in_layers]
    by_size = sorted(per_layer, key=lambda params: sum(weight_bytes(p) for p in params), reverse=True)
    largest = by_size[:n_active]
    trained = always_on + [p for params in largest for p in params]

    weights = sum(weight_bytes(p) for p in _unique(p for p in model.parameters()))
    if shards > 1:
        compute_size = 2 if precision == "bf16-mixed" else None
        gathered = always_on + [p for params in by_size[:2] for p in params]
        weights += sum(p.numel() * (compute_size or p.element_size()) for p in gathered)
    gradients = sum(weight_bytes(p) for p in trained)
    tier = "cpu" if offload == "auto" else offload
    if tier == "none":
        resident_states, resident_masters = state_and_master(always_on + [p for params in per_layer for p in params])
    else:
        offloaded = [p for params in largest for p in params] + (always_on if offload_always_on else [])
        states, masters = state_and_master(offloaded)
        if budget is not None and states + masters > budget:
            states, masters = states * budget // (states + masters), masters * budget // (states + masters)
        kept_states, kept_masters = state_and_master([] if offload_always_on else always_on)
        resident_states, resident_masters = states + kept_states, masters + kept_masters
    return MemoryEstimate(weights, gradients, resident_masters, resident_states)


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())
