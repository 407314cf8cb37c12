"""fp32 master weights for half-precision parameters, kept in the optimizer state so that they travel with it.

A bf16 weight cannot hold an AdamW update smaller than half its last bit: at fine-tuning learning rates most
updates would be rounded away. So the optimizer steps an fp32 *master* copy instead, with fp32 moments and
the half gradient cast to fp32, and the rounded result is written back into the half weight.

The master lives in ``optimizer.state[param][MASTER_KEY]``, beside the moments. Wherever the state goes (the
device while the tensor is updated, host memory or disk otherwise, a checkpoint), the master goes too, so a
layer drawn again resumes from its exact master and no precision is lost between windows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

#: The optimizer-state key of a parameter's fp32 master weight.
MASTER_KEY = "master_weight"

#: Parameter dtypes that get a master weight.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def needs_master(param: Tensor) -> bool:
    """Whether ``param`` is a half-precision floating tensor, whose updates need an fp32 master."""
    return param.dtype in HALF_DTYPES


def enter_master(optimizer: Optimizer, param: nn.Parameter) -> Tensor:
    """Move ``param``'s optimizer state onto its fp32 master and give the master ``param``'s gradient in fp32.

    The first time, the master is ``param`` cast to fp32, which is exact. Until :func:`leave_master`, the
    optimizer must be stepped with the returned master in ``param``'s place.

    Args:
        optimizer: The optimizer that holds ``param``'s state.
        param: A half-precision parameter with a gradient.

    Returns:
        The master, a float32 tensor of ``param``'s shape on ``param``'s device.
    """
    state = optimizer.state.pop(param, {})
    master = state.pop(MASTER_KEY, None)
    if master is None:
        master = param.detach().to(torch.float32, copy=True)
    master.grad = param.grad.to(torch.float32)
    if state:
        optimizer.state[master] = state
    return master


def leave_master(optimizer: Optimizer, param: nn.Parameter, master: Tensor) -> None:
    """Give the master's state back to ``param``, with the master in it, and round the master into ``param``."""
    state = optimizer.state.pop(master, {})
    master.grad = None
    state[MASTER_KEY] = master
    optimizer.state[param] = state
    with torch.no_grad():
        param.copy_(master)
