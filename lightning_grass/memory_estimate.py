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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_grass.byte_size import format_bytes
from lightning_grass.errors import SettingValueError
from lightning_grass.offload import expected_state_bytes, needs_master, step_workspace_bytes
from lightning_grass.offload.row_chunks import chunk_numel, row_ranges, rows_per_chunk
from lightning_grass.offload.settings import PRECISIONS, OffloadSettings, check_sharded_precision
from lightning_grass.offload.state_bytes import STEP_COUNTER_BYTES
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


@dataclass(frozen=True)
class _TensorBytes:
    """What one parameter's optimizer state takes on the device, and what stepping it adds."""

    state: int  # moments and step counter
    master: int  # fp32 master weight
    workspace: int  # fp32 master gradient and AdamW's temporaries, while it is stepped

    @property
    def resident(self) -> int:
        return self.state + self.master

    @property
    def stepped(self) -> int:
        return self.state + self.master + self.workspace

    def at_rest(self) -> _TensorBytes:
        """The same tensor while it is not stepped: no workspace."""
        return _TensorBytes(self.state, self.master, 0)


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

    What the offload holds is counted tensor by tensor, as the strategy's budget counts it
    (:func:`~lightning_grass.offload.device_bytes_while_stepped`), at its peak. Without ``max_resident_bytes``,
    or when every offloaded tensor fits in it while stepped, they are stepped together: their states, masters
    and workspaces add up. Otherwise they stream in update order (each active layer's tensors in registration
    order, then the always-on ones if offloaded; a tensor larger than the budget in chunks of rows, as the
    strategy cuts it), and the peak is the tensor (or chunk) being stepped with, when it fits beside it, the next
    ones' states that the store fetches during the update, as deep as the budget allows. On a CPU run
    ``master_weights + optimizer_states + step_workspace`` is then ``offload_stats["peak_resident_bytes"]``
    exactly; on CUDA, or with the disk tier, a write-back still in flight can hold one more tensor's state for a
    while, never beyond the budget. A budget that cannot hold one row of an offloaded tensor while it is stepped
    (with ``shards > 1``, the largest shard: shards are not chunked) is refused, as the strategy refuses it,
    with the bytes it needs.

    Left out, like activations: the workspace of the step over resident states (the always-on modules' unless
    offloaded, every layer's with ``offload="none"``), up to 4 bytes per element for master gradients plus one
    temporary (``foreach``) or two (for-loop) of the state's dtype.

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
    if not 1 <= n_active <= layer_map.num_layers:
        raise SettingValueError(
            f"n_active={n_active} must be between 1 and the number of layers ({layer_map.num_layers})"
        )
    budget = settings.max_resident_bytes
    tier = "cpu" if offload == "auto" else offload
    dtype = PRECISIONS[precision]

    def numel(param: nn.Parameter) -> int:
        return -(-param.numel() // shards)

    def weight_bytes(param: nn.Parameter) -> int:
        return numel(param) * (torch.empty((), dtype=dtype).element_size() if dtype else param.element_size())

    per_layer = [_unique(layer_map.layer_parameters(i)) for i in range(layer_map.num_layers)]
    in_layers = {id(p) for params in per_layer for p in params}
    groups = [group for group in ALWAYS_ON_GROUPS if group != "towers" or train_towers]
    always_on = [p for group in groups for p in layer_map.group_parameters(group) if id(p) not in in_layers]
    by_size = sorted(
        range(layer_map.num_layers), key=lambda i: sum(weight_bytes(p) for p in per_layer[i]), reverse=True
    )
    largest = [p for index in sorted(by_size[:n_active]) for p in per_layer[index]]
    sizes, chunks = _tensor_bytes(
        always_on + [p for params in per_layer for p in params], dtype, shards, master_weights, foreach, budget
    )

    weights = sum(weight_bytes(p) for p in _unique(p for p in model.parameters()))
    if shards > 1:
        compute_size = 2 if precision in ("bf16-mixed", "bf16-true") else None
        gathered = always_on + [p for index in by_size[:2] for p in per_layer[index]]
        weights += sum(p.numel() * (compute_size or p.element_size()) for p in gathered)
    gradients = sum(weight_bytes(p) for p in always_on + largest)
    if tier == "none":
        resident, offloaded = always_on + [p for params in per_layer for p in params], []
    else:
        resident = [] if offload_always_on else always_on
        offloaded = largest + (always_on if offload_always_on else [])
    _check_budget(model, budget, offloaded, sizes, chunks, shards)
    units = [unit for p in offloaded for unit in chunks[id(p)]]
    held = _held_at_peak(units, budget) + [sizes[id(p)].at_rest() for p in resident]
    return MemoryEstimate(
        weights,
        gradients,
        master_weights=sum(part.master for part in held),
        optimizer_states=sum(part.state for part in held),
        step_workspace=sum(part.workspace for part in held),
    )


def _tensor_bytes(
    params: list[nn.Parameter],
    dtype: torch.dtype | None,
    shards: int,
    master_weights: bool,
    foreach: bool,
    budget: int | None,
) -> tuple[dict[int, _TensorBytes], dict[int, list[_TensorBytes]]]:
    """Each parameter's state, master and step workspace, and the units the offload streams it in, by ``id``.

    The units are the whole tensor, or its chunks of rows when it does not fit in the budget, by the strategy's
    arithmetic. It runs on stand-ins on the ``meta`` device, of the dtype each parameter trains in and of its
    shape (one rank's numel under ``shards``), held by an AdamW that is never stepped: nothing is allocated.
    """
    stand_ins = [
        nn.Parameter(
            torch.empty(p.shape if shards == 1 else (-(-p.numel() // shards),), dtype=dtype or p.dtype, device="meta")
        )
        for p in params
    ]
    adamw = torch.optim.AdamW(stand_ins, foreach=foreach)
    sizes: dict[int, _TensorBytes] = {}
    chunks: dict[int, list[_TensorBytes]] = {}
    for param, stand_in in zip(params, stand_ins, strict=True):
        mastered = master_weights and needs_master(stand_in)

        def part(numel: int, stand_in: nn.Parameter = stand_in, mastered: bool = mastered) -> _TensorBytes:
            master = 4 * numel if mastered else 0
            return _TensorBytes(
                state=expected_state_bytes(adamw, stand_in, mastered, numel) - master,
                master=master,
                workspace=step_workspace_bytes(adamw, stand_in, mastered, numel),
            )

        whole = sizes[id(param)] = part(stand_in.numel())
        rows = 0
        if budget is not None and whole.stepped > budget and shards == 1 and stand_in.dim():
            rows = rows_per_chunk(adamw, stand_in, mastered, budget)
        ranges = row_ranges(stand_in.shape[0], rows) if rows else []
        chunks[id(param)] = [part(chunk_numel(stand_in, chunk)) for chunk in ranges] or [whole]
    return sizes, chunks


def _check_budget(
    model: nn.Module,
    budget: int | None,
    offloaded: list[nn.Parameter],
    sizes: dict[int, _TensorBytes],
    chunks: dict[int, list[_TensorBytes]],
    shards: int,
) -> None:
    """Refuse a budget the offload cannot work in, as the strategy does.

    That is a budget below one row of an offloaded tensor, or, with ``shards > 1`` (shards are not chunked), below
    the largest offloaded shard while stepped.
    """
    if budget is None or not offloaded:
        return
    worst = max(offloaded, key=lambda p: max(unit.stepped for unit in chunks[id(p)]))
    if max(unit.stepped for unit in chunks[id(worst)]) <= budget:
        return
    needed = sizes[id(worst)].stepped
    name = next(name for name, p in model.named_parameters() if p is worst)
    holds = (
        f"max_resident_bytes={budget} bytes ({format_bytes(budget)}) cannot hold {name} while it is stepped "
        f"({needed} bytes: its optimizer state and step counter, its fp32 master and master gradient if it has one, "
        "and AdamW's temporaries)"
    )
    if shards > 1:
        raise SettingValueError(
            f"{holds}, and the shards of grass_fsdp are not split into chunks of rows; raise it to at least "
            f"{needed} bytes, or to {2 * needed} bytes so that the next tensor's fetch overlaps the update"
        )
    row = _one_row(worst, sizes[id(worst)])
    raise SettingValueError(
        f"{holds}, nor one row of it ({row} bytes), the smallest chunk it is stepped in; raise it to at least "
        f"{row} bytes"
    )


def _one_row(param: nn.Parameter, whole: _TensorBytes) -> int:
    """Bytes one row of ``param`` needs while stepped: its share of the whole tensor's, with a step counter."""
    rows = param.shape[0] if param.dim() else 1
    per_element = (whole.stepped - STEP_COUNTER_BYTES) // param.numel()
    return per_element * (param.numel() // rows) + STEP_COUNTER_BYTES


def _held_at_peak(units: Sequence[_TensorBytes], budget: int | None) -> list[_TensorBytes]:
    """What the offload store holds at its peak, for offloaded tensors (or chunks) in update order, as its parts.

    Every unit, stepped, when all fit in the budget together (or there is none). Otherwise the unit being
    stepped, and the states of the next ones the store prefetches during its update: as many as fit beside it,
    and whose states with the largest of their workspaces fit in the budget
    (:meth:`~lightning_grass.offload.TensorStateStore.prefetch_ahead`).
    """
    if budget is None or sum(unit.stepped for unit in units) <= budget:
        return list(units)
    peak: list[_TensorBytes] = []
    for index, unit in enumerate(units):
        held = [unit]
        ahead = workspace = 0
        for count, following in enumerate(units[index + 1 :]):
            ahead += following.resident
            workspace = max(workspace, following.workspace)
            if (count and ahead + workspace > budget) or unit.stepped + ahead > budget:
                break
            held.append(following.at_rest())
        if sum(part.stepped for part in held) > sum(part.stepped for part in peak):
            peak = held
    return peak


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())
