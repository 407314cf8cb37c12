"""Mean gradient norm (MGN): the per-layer importance signal of GRASS, as plain tensor code.

For layer ``l`` over a window of ``T`` optimizer steps (Tian et al., 2026)::

    m_l = (1/T) * sum_t sqrt(||g_t^(l)||^2 / N_l)

where ``g_t^(l)`` is the accumulated, unscaled gradient of all of layer ``l``'s parameters at step ``t`` and
``N_l`` its parameter count. Each step only adds to device tensors; nothing is copied to the host until the
window is closed by :meth:`MeanGradNorm.initialize` or :meth:`MeanGradNorm.refresh`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from lightning_grass.errors import CheckpointError

log = logging.getLogger(__name__)


def grouped_sq_norms(grads: list[Tensor], group_index: Tensor, num_groups: int) -> Tensor:
    """Sum of squared L2 norms of ``grads`` per group, in one batched kernel and without a host sync.

    Gradients sharded across ranks (``DTensor`` s whose placements are all ``Shard``, as FSDP2 makes them)
    count whole: each rank adds the squares of its own shard, and the per-group sums are all-reduced over
    the shards' process group. Every element lives in exactly one shard, so every rank gets the full norm;
    and every rank must call this at the same point, as GRASS's strategies ensure by drawing the same layers
    everywhere.

    Args:
        grads: Gradient tensors, any shapes and dtypes, all on one device; plain tensors, or sharded
            ``DTensor`` s on one device mesh.
        group_index: ``int64`` tensor on the same device, ``group_index[i]`` is the group of ``grads[i]``.
        num_groups: Length of the result.

    Returns:
        A float32 tensor of shape ``(num_groups,)``: ``sum over i in group g of ||grads[i]||^2``. A non-finite
        gradient makes its group's entry non-finite.

    Raises:
        NotImplementedError: For a ``DTensor`` that is replicated along some mesh dimension.
    """
    result = torch.zeros(num_groups, dtype=torch.float32, device=group_index.device)
    if not grads:
        return result
    sharded = [i for i, grad in enumerate(grads) if isinstance(grad, DTensor)]
    if not sharded:
        result.index_add_(0, group_index, torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square())
        return result
    mesh = grads[sharded[0]].device_mesh
    for i in sharded:
        if not all(isinstance(placement, Shard) for placement in grads[i].placements):
            raise NotImplementedError(f"gradient {i} is a DTensor placed {grads[i].placements}; only Shard is summed")
    local = [grad.to_local() if isinstance(grad, DTensor) else grad for grad in grads]
    squares = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float32)).square()
    is_sharded = torch.tensor([isinstance(grad, DTensor) for grad in grads], device=group_index.device)
    result.index_add_(0, group_index, torch.where(is_sharded, squares, 0.0))
    for dim in range(mesh.ndim):
        torch.distributed.all_reduce(result, group=mesh.get_group(dim))
    result.index_add_(0, group_index, torch.where(is_sharded, 0.0, squares))
    return result


class MeanGradNorm:
    """Window accumulators and EMA-refreshed importance for ``L`` layers.

    A layer with no trainable parameter (``N_l = 0``: frozen by the user before fit) gets no gradient, so its
    importance is exactly 0; the caller leaves it out of sampling.

    Args:
        layer_numel: Parameter count ``N_l`` of each layer's trainable parameters, shape ``(L,)``.
        device: Where the accumulators live (the device the gradients are on).
    """

    def __init__(self, layer_numel: Tensor, device: torch.device | str = "cpu") -> None:
        self.layer_numel = layer_numel.to(device=device, dtype=torch.float32)
        num_layers = self.layer_numel.numel()
        self.window_sum = torch.zeros(num_layers, dtype=torch.float32, device=device)
        self.window_count = torch.zeros(num_layers, dtype=torch.float32, device=device)
        self.importance = torch.zeros(num_layers, dtype=torch.float32, device=device)

    @property
    def num_layers(self) -> int:
        """Number of layers tracked."""
        return self.layer_numel.numel()

    def accumulate(
        self, layer_sq_norms: Tensor, measured: Tensor, step_is_finite: Tensor, scale_sq: Tensor | None = None
    ) -> None:
        """Add one optimizer step's per-layer gradient RMS to the window.

        Args:
            layer_sq_norms: ``||g_t^(l)||^2`` per layer, shape ``(L,)``.
            measured: Boolean mask of the layers that had gradients this step.
            step_is_finite: Scalar boolean tensor. When false (a step the grad scaler skips), the step
                contributes nothing.
            scale_sq: What ``||g||^2`` is divided by before the square root: ``N_l`` (the default) gives the
                gradient RMS; the layer's ``||w||^2`` gives the gradient norm relative to the weight norm.
        """
        include = measured & step_is_finite
        rms = torch.sqrt(layer_sq_norms / (self.layer_numel if scale_sq is None else scale_sq))
        self.window_sum += torch.where(include, rms, torch.zeros_like(rms))
        self.window_count += include.to(self.window_count.dtype)

    def window_mean(self) -> Tensor:
        """Mean RMS per layer over the open window; ``nan`` for layers with no measured step."""
        return self.window_sum / self.window_count

    def initialize(self) -> Tensor:
        """Close the probing window: importance becomes the window mean of every layer.

        A trainable layer with no finite step in the window takes the mean of the measured layers (or 1.0 if
        none was measured), so that sampling stays defined; a layer with no trainable parameter gets 0. This is
        the only point where all layers are measured.

        Returns:
            The new importance, shape ``(L,)``.
        """
        mean = self.window_mean()
        trainable = self.layer_numel > 0
        measured = (self.window_count > 0) & trainable
        fallback = mean[measured].mean() if bool(measured.any()) else torch.ones((), device=mean.device)
        unmeasured = trainable & ~measured
        if bool(unmeasured.any()):
            log.warning("MGN: layers %s had no finite gradient while probing", unmeasured.nonzero().flatten().tolist())
        self.importance = torch.where(measured, mean, torch.where(trainable, fallback, 0.0))
        self._reset_window()
        return self.importance

    def refresh(self, ema: float) -> Tensor:
        """Close the window: ``m <- ema * m_window + (1 - ema) * m`` for layers measured in it.

        Layers that were frozen for the whole window keep their previous (stale) importance.

        Args:
            ema: Weight ``alpha`` of the new window, in ``(0, 1]``.

        Returns:
            The new importance, shape ``(L,)``.
        """
        measured = self.window_count > 0
        updated = ema * self.window_mean() + (1.0 - ema) * self.importance
        self.importance = torch.where(measured, updated, self.importance)
        self._reset_window()
        return self.importance

    def state_dict(self) -> dict[str, Tensor]:
        """Accumulators and importance, as CPU tensors."""
        return {
            "window_sum": self.window_sum.cpu(),
            "window_count": self.window_count.cpu(),
            "importance": self.importance.cpu(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned, onto this tracker's device."""
        for name in ("window_sum", "window_count", "importance"):
            value = state[name]
            if value.shape != (self.num_layers,):
                raise CheckpointError(
                    f"MGN state {name!r} has shape {tuple(value.shape)}, expected ({self.num_layers},): "
                    "the checkpoint was written for a model with a different number of layers"
                )
            setattr(self, name, value.to(device=self.layer_numel.device, dtype=torch.float32).clone())

    def _reset_window(self) -> None:
        self.window_sum.zero_()
        self.window_count.zero_()
