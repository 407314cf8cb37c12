"""Where a checkpointed optimizer-state tensor goes when it is resident: torch's loading policy, masters included."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grass.offload.master_weights import MASTER_KEY
from lightning_grass.offload.sharded_tensors import local_part
from lightning_grass.offload.transfer import TensorSpec


def resident_spec(optimizer: Optimizer, param: nn.Parameter, key: str, value: Tensor, mastered: bool) -> TensorSpec:
    """Shape, dtype and device that ``value``, saved as ``param``'s state ``key``, takes on loading.

    As :meth:`torch.optim.Optimizer.load_state_dict` places it: a ``step`` counter stays float32 on the CPU
    unless the optimizer is fused or capturable, when it goes to the parameter's device. Other floating point
    states take the parameter's dtype and device, or float32 for a parameter with an fp32 master (whose moments
    are the master's). For a sharded parameter the shape is this rank's shard's.

    Args:
        optimizer: The optimizer that holds ``param``.
        param: The parameter the state belongs to.
        key: The state's key (``"step"``, ``"exp_avg"``, ...).
        value: The saved tensor (a ``DTensor`` for a sharded state).
        mastered: Whether ``param`` is stepped on an fp32 master.

    Returns:
        The spec.
    """
    shape = tuple(local_part(value).shape)
    device = local_part(param).device
    if key == "step":
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        return TensorSpec(shape, torch.float32, device if on_device else torch.device("cpu"))
    if not value.is_floating_point():
        return TensorSpec(shape, value.dtype, device)
    fp32 = mastered or key == MASTER_KEY
    return TensorSpec(shape, torch.float32 if fp32 else param.dtype, device)
