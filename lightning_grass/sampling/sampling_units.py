"""What GRASS samples: whole transformer layers, or the weight matrices inside them (modules).

With ``unit="layer"`` (the paper's method) each block found by :func:`~lightning_grass.discover_layers` is one
unit. With ``unit="module"`` (as MISA, Zhang et al., 2025) each module inside a block that holds a weight matrix is
one: in a Llama block ``self_attn.q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and ``mlp.gate_proj``, ``up_proj``,
``down_proj``. The rule is generic, so every architecture that layer discovery supports has its modules without a
table: a module is a unit when it holds, directly, a parameter of two or more dimensions (an ``nn.Linear``, GPT-2's
``Conv1D``, an embedding inside a block, a mixture of experts' fused expert weights), and the unit is every
parameter it holds directly (the weight with its bias). In a ``peft`` model the LoRA matrices are units of their
own, and the frozen base weights are units with nothing to train.

What no module unit holds stays frozen in module mode: each block's norms, and any other vector parameter held by a
module without a matrix (a gate, a scale). A norm feeds several modules at once (``input_layernorm`` scales what
``q_proj``, ``k_proj`` and ``v_proj`` read), so it belongs to no single one of them; giving it to each would make
it train with whichever is drawn and add its gradient, of another kind and scale, to their importance. Norms hold
about 0.03% of a block's parameters; keeping their pretrained values is what LoRA does too.

A module held by several blocks (Zamba2's shared block) is one unit, at the first block that holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_grass.sampling.layer_discovery import LayerMap

#: Accepted values of ``unit``: whole layers (the paper's method), or the weight matrices inside them.
UNITS = ("layer", "module")


@dataclass(frozen=True, eq=False)
class SamplingUnits:
    """The units GRASS probes, draws and trains, in the model's order.

    Attributes:
        kind: ``"layer"`` or ``"module"``.
        names: One per unit: the layer index (``"3"``), or the layer index and the module's dotted path inside
            its block (``"3.self_attn.q_proj"``).
        layers: The layer (block index) each unit is in.
        parameters: Each unit's parameters, in registration order.
        left_out: The blocks' parameters that no unit holds (module mode: the norms), which stay frozen.
    """

    kind: str
    names: tuple[str, ...]
    layers: tuple[int, ...]
    parameters: tuple[tuple[nn.Parameter, ...], ...]
    left_out: tuple[nn.Parameter, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def layers_of(self, units: Iterable[int]) -> list[int]:
        """The layers that hold ``units``, ascending, each once."""
        return sorted({self.layers[unit] for unit in units})

    def describe(self, units: Sequence[int]) -> str:
        """``units`` as messages name them: layer indices, or module names."""
        if self.kind == "layer":
            return f"layers {[self.layers[unit] for unit in units]}"
        return f"modules {[self.names[unit] for unit in units]}"


def sampling_units(layer_map: LayerMap, unit: str = "layer") -> SamplingUnits:
    """Split a model's blocks into the units GRASS samples.

    Args:
        layer_map: The model's :class:`~lightning_grass.LayerMap`.
        unit: ``"layer"`` (each block) or ``"module"`` (each module in a block that directly holds a parameter of two
            or more dimensions; see the module docstring).

    Returns:
        The :class:`SamplingUnits`, blocks in forward order and each block's modules in registration order.

    Raises:
        ValueError: For an unknown ``unit``.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_grass import discover_layers
        >>> model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        ...     num_attention_heads=4, num_key_value_heads=4, vocab_size=100))
        >>> units = sampling_units(discover_layers(model), "module")
        >>> len(units), units.names[:2]
        (14, ('0.self_attn.q_proj', '0.self_attn.k_proj'))
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not supported; use one of {UNITS}")
    if unit == "layer":
        count = layer_map.num_layers
        return SamplingUnits(
            kind="layer",
            names=tuple(str(index) for index in range(count)),
            layers=tuple(range(count)),
            parameters=tuple(tuple(layer_map.layer_parameters(index)) for index in range(count)),
        )
    names: list[str] = []
    layers: list[int] = []
    parameters: list[tuple[nn.Parameter, ...]] = []
    taken: set[int] = set()
    for index, block in enumerate(layer_map.blocks):
        for path, module in block.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in taken]
            if not any(p.ndim >= 2 for p in own):
                continue
            taken.update(id(p) for p in own)
            names.append(f"{index}.{path}" if path else str(index))
            layers.append(index)
            parameters.append(tuple(own))
    left_out: dict[int, nn.Parameter] = {}
    for index in range(layer_map.num_layers):
        for p in layer_map.layer_parameters(index):
            if id(p) not in taken:
                left_out.setdefault(id(p), p)
    return SamplingUnits("module", tuple(names), tuple(layers), tuple(parameters), tuple(left_out.values()))
