"""A sharded (FSDP2) state tensor's local part, and how to wrap a stored part back into a ``DTensor``.

Under ``fully_shard`` every parameter is a ``DTensor``, and so are the optimizer states torch creates for it
(moments, fp32 master). A rank owns only its local shard: that is what it offloads, sizes and stores. The
offload engine therefore works on local parts (:func:`local_part`) and remembers, per state tensor, where the
part sits in the global tensor (:class:`ShardPlacement`), to rebuild the ``DTensor`` when the state is installed
or saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta


def local_part(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: the local shard of a ``DTensor``, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_numel(tensor: Tensor) -> int:
    """Elements of this rank's part of ``tensor``."""
    return local_part(tensor).numel()


@dataclass(frozen=True)
class ShardPlacement:
    """Where a ``DTensor``'s local shard sits in the global tensor: its mesh, placements, global shape and stride."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, tensor: Tensor) -> ShardPlacement | None:
        """The placement of a ``DTensor``; ``None`` for a plain tensor."""
        if not isinstance(tensor, DTensor):
            return None
        return cls(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))

    def around(self, local: Tensor) -> DTensor:
        """A ``DTensor`` whose local shard is ``local`` itself, wherever it lives.

        ``DTensor.from_local`` copies a host tensor to the mesh's device (on a CUDA mesh, every offloaded state
        shard would pass through GPU memory at each checkpoint save). FSDP2 keeps CPU-offloaded shards on a CUDA
        mesh the same way, through the ``DTensor`` constructor with a spec of the shard's dtype; the spec type is
        torch's private ``DTensorSpec``, the one part of this module that depends on torch internals.
        """
        meta = TensorMeta(self.shape, self.stride, local.dtype)
        spec = DTensorSpec(self.mesh, self.placements, tensor_meta=meta)
        return DTensor(local, spec, requires_grad=False)
