"""How many bytes an optimizer's state takes, and what its step allocates on the device beside it.

What is resident now (:func:`optimizer_state_bytes`), what a parameter's state will take once it exists
(:func:`expected_state_bytes`), and the transient bytes of the step that updates it
(:func:`step_workspace_bytes`): together, :func:`device_bytes_while_stepped` is what a byte budget must hold
for one tensor while it is updated. A sharded (``DTensor``) parameter counts this rank's shard.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grass.offload.sharded_tensors import local_numel

#: Moment tensors per parameter of AdamW without ``amsgrad``, the optimizer that :func:`expected_state_bytes`
#: assumes for optimizers it does not know.
ADAMW_MOMENTS = 2

#: Bytes of the float32 ``step`` counter that Adam-style optimizers keep per parameter.
STEP_COUNTER_BYTES = 4


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``: the states resident now (this rank's shards, if sharded)."""
    return sum(
        local_numel(value) * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


def moments_per_element(optimizer: Optimizer, param: nn.Parameter) -> int:
    """Tensors of ``param``'s shape that ``optimizer`` keeps for it.

    2 for Adam and AdamW (3 with ``amsgrad``), 1 for SGD with momentum, 0 for plain SGD, and AdamW's 2 for any
    other optimizer.
    """
    group = _group_of(optimizer, param)
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if group.get("momentum", 0) else 0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and group.get("amsgrad"):
        return 3
    return ADAMW_MOMENTS


def expected_state_bytes(optimizer: Optimizer, param: nn.Parameter, master: bool, numel: int | None = None) -> int:
    """Bytes ``param``'s optimizer state will take once it exists: its moments, step counter and fp32 master.

    Moments are float32 when ``param`` has a master (the optimizer steps the master) and of ``param``'s dtype
    otherwise.

    Args:
        optimizer: The optimizer that holds ``param``.
        param: The parameter.
        master: Whether ``param`` gets an fp32 master weight.
        numel: Elements stepped at once, for a chunk of ``param``; ``None`` is the whole (local) tensor.

    Returns:
        The byte count.
    """
    element = 4 if master else param.element_size()
    moments = moments_per_element(optimizer, param)
    step = 0 if isinstance(optimizer, torch.optim.SGD) else STEP_COUNTER_BYTES
    count = local_numel(param) if numel is None else numel
    return count * (moments * element + (4 if master else 0)) + step


def expected_state_tensors(optimizer: Optimizer, param: nn.Parameter, master: bool) -> int:
    """Tensors in ``param``'s optimizer state once it exists: its moments, step counter and fp32 master.

    Counted by the rules of :func:`expected_state_bytes`: AdamW's 2 moments and a step counter for any optimizer
    it does not know.
    """
    step = 0 if isinstance(optimizer, torch.optim.SGD) else 1
    return moments_per_element(optimizer, param) + step + (1 if master else 0)


def step_workspace_bytes(optimizer: Optimizer, param: nn.Parameter, master: bool, numel: int | None = None) -> int:
    """Bytes the optimizer's step over ``param`` allocates on the device beyond its state, freed when it returns.

    The fp32 gradient of a parameter stepped on a master (4 bytes per element), and the temporaries of the
    update, counted from torch's implementations (elements of the state's dtype): fused Adam, AdamW and SGD
    allocate none; Adam and AdamW keep one (the denominator) with ``foreach`` and two with the for-loop
    (``sqrt`` then the division); SGD one modified gradient for ``maximize``, ``weight_decay`` or ``nesterov``
    (two while one replaces another); Adam with L2
    ``weight_decay`` (not decoupled) or ``maximize`` one more for the modified gradient. ``foreach=None`` is
    torch's default, the foreach path for CUDA tensors and the for-loop elsewhere. Any other optimizer is
    counted as the for-loop AdamW.

    Args:
        optimizer: The optimizer that holds ``param``.
        param: The parameter.
        master: Whether ``param`` is stepped on an fp32 master.
        numel: Elements stepped at once, for a chunk of ``param``; ``None`` is the whole (local) tensor.

    Returns:
        The byte count.
    """
    group = _group_of(optimizer, param)
    element = 4 if master else param.element_size()
    master_gradient = 4 if master else 0
    count = local_numel(param) if numel is None else numel
    return count * (master_gradient + _temporaries(optimizer, group, param) * element)


def device_bytes_while_stepped(
    optimizer: Optimizer, param: nn.Parameter, master: bool, numel: int | None = None
) -> int:
    """Device bytes ``param`` (or a chunk of ``numel`` of its elements) needs while its update runs.

    Its state (master included) and the step's workspace: what a ``max_resident_bytes`` budget must hold for the
    largest offloaded tensor, or chunk.
    """
    return expected_state_bytes(optimizer, param, master, numel) + step_workspace_bytes(optimizer, param, master, numel)


def _group_of(optimizer: Optimizer, param: nn.Parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def _temporaries(optimizer: Optimizer, group: dict, param: nn.Parameter) -> int:
    """Tensors of ``param``'s shape one step over it allocates at the same time, by torch's implementations."""
    if group.get("fused"):
        return 0
    foreach = group.get("foreach")
    vectorized = foreach if foreach is not None else param.device.type == "cuda"
    if isinstance(optimizer, torch.optim.SGD):
        # Each of maximize, weight decay and nesterov makes a new gradient; the one before it is freed next.
        changes = [group.get("maximize"), group.get("weight_decay"), group.get("nesterov")]
        return min(2, sum(1 for change in changes if change))
    base = 1 if vectorized else 2
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        l2_decay = bool(group.get("weight_decay")) and not decoupled
        return base + (1 if l2_decay or group.get("maximize") else 0)
    return 2
