"""How many bytes an optimizer's state takes: what is resident now, and what a parameter's state will take."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

#: Moment tensors per parameter of AdamW without ``amsgrad``, the optimizer that :func:`expected_state_bytes`
#: assumes for optimizers it does not know.
ADAMW_MOMENTS = 2

#: Bytes of the float32 ``step`` counter that Adam-style optimizers keep per parameter.
STEP_COUNTER_BYTES = 4


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``: the states resident now."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


def moments_per_element(optimizer: Optimizer, param: nn.Parameter) -> int:
    """Tensors of ``param``'s shape that ``optimizer`` keeps for it.

    2 for Adam and AdamW (3 with ``amsgrad``), 1 for SGD with momentum, 0 for plain SGD, and AdamW's 2 for any
    other optimizer.
    """
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if isinstance(optimizer, torch.optim.SGD):
        return 1 if group.get("momentum", 0) else 0
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and group.get("amsgrad"):
        return 3
    return ADAMW_MOMENTS


def expected_state_bytes(optimizer: Optimizer, param: nn.Parameter, master: bool) -> int:
    """Bytes ``param``'s optimizer state will take once it exists: its moments, step counter and fp32 master.

    Moments are float32 when ``param`` has a master (the optimizer steps the master) and of ``param``'s dtype
    otherwise.

    Args:
        optimizer: The optimizer that holds ``param``.
        param: The parameter.
        master: Whether ``param`` gets an fp32 master weight.

    Returns:
        The byte count.
    """
    element = 4 if master else param.element_size()
    moments = moments_per_element(optimizer, param)
    step = 0 if isinstance(optimizer, torch.optim.SGD) else STEP_COUNTER_BYTES
    return param.numel() * (moments * element + (4 if master else 0)) + step
