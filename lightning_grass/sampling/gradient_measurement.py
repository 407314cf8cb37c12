"""``LayerGradientMeter``: each layer's squared gradient norm at an optimizer step, as GRASS's MGN needs it.

Gradients are read on optimizer-step boundaries: after gradient accumulation, after AMP unscaling (also for
fused optimizers, which unscale inside ``step()`` and leave the gradients scaled until then), before
clipping. The reads are batched tensor ops without a host synchronisation. The meter also sums the active
layers' squared norms over a window, so that the callback can tell, with one host read at the window's end,
whether any gradient reached them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_grass.offload.sharded_tensors import local_part
from lightning_grass.sampling.importance import grouped_sq_norms


class LayerGradientMeter:
    """Reads ``||g_t^(l)||^2`` for every measured layer ``l`` at each optimizer step.

    A "layer" here is any sampling unit: a transformer block, or a module inside one with ``unit="module"``.

    Outside probing, the measured layers are the active ones, and their gradients are read at the optimizer
    step. While probing on one process, every layer trains, and gradient hooks fold each parameter's
    accumulated gradient into per-layer sums during the backward pass and free it at once, so probing holds
    no more gradient memory than training. Under DDP the hooks would see gradients before the all-reduce, so
    probing reads the synchronised gradients of every layer at the step instead (``use_probe_hooks=False``).

    Args:
        layer_params: The managed parameters of each layer.
        always_on_params: The trained parameters outside the layers (embeddings, head, final norm).
        device: Where the per-layer sums live: the device of the gradients.
        use_probe_hooks: Measure probing steps in gradient hooks (one process) rather than at the step.
        free_probe_grads: Let the hooks free each gradient once it is measured. Keep them when a grad scaler
            must still check them and no always-on parameter keeps the step alive.
        describe: How warnings name a list of units (``"layers [0, 3]"``); ``None`` names layer indices.
    """

    def __init__(
        self,
        layer_params: Sequence[Sequence[nn.Parameter]],
        always_on_params: Sequence[nn.Parameter],
        device: torch.device,
        use_probe_hooks: bool,
        free_probe_grads: bool,
        describe: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        self.num_layers = len(layer_params)
        self.device = device
        self.micro_batch_closes_step = True
        self.active_mask = torch.zeros(self.num_layers, dtype=torch.bool, device=device)
        self._layer_params = layer_params
        self._always_on_params = always_on_params
        self._use_probe_hooks = use_probe_hooks
        self._free_probe_grads = free_probe_grads
        self._describe = describe or (lambda layers: f"layers {list(layers)}")
        self._probe_sq = torch.zeros(self.num_layers, device=device)
        self._window = torch.zeros(2, device=device)
        self._scaled_steps: list[tuple[int, Tensor]] = []
        self._probe_hooks: list[RemovableHandle] = []
        self._measured_params: list[nn.Parameter] = []
        self._measured_groups: list[int] = []
        self._group_index_cache: dict[tuple[int, ...], Tensor] = {}
        self._weight_index_cache: dict[tuple[int, ...], tuple[list[nn.Parameter], Tensor]] = {}

    def set_active(self, active_layers: Sequence[int], probing: bool) -> None:
        """Measure ``active_layers`` from the next step on; while probing with hooks, the hooks measure instead."""
        mask = torch.zeros(self.num_layers, dtype=torch.bool)
        mask[list(active_layers)] = True
        self.active_mask = mask.to(self.device)
        if probing and self._use_probe_hooks:
            measured = []
        else:
            measured = [(i, p) for i in active_layers for p in self._layer_params[i]]
        self._measured_params = [p for _, p in measured]
        self._measured_groups = [layer for layer, _ in measured]
        self._group_index_cache.clear()

    def start_probe_hooks(self) -> None:
        """Measure every layer's gradient in the backward pass (one process only)."""
        if not self._use_probe_hooks:
            return
        for index, params in enumerate(self._layer_params):
            for p in params:
                self._probe_hooks.append(p.register_post_accumulate_grad_hook(partial(self._on_probe_grad, index)))

    def stop_probe_hooks(self) -> None:
        """Remove the probing hooks."""
        for handle in self._probe_hooks:
            handle.remove()
        self._probe_hooks.clear()

    def read_step(self, optimizer: Optimizer, scaler: torch.amp.GradScaler | None, probing: bool) -> Tensor:
        """This step's unscaled ``||g^(l)||^2`` per layer, zero for layers that were not measured.

        While probing, it also removes every managed gradient, so that the optimizer step changes nothing
        and creates no state; the grad scaler checks the gradients first.

        Args:
            optimizer: The optimizer about to step.
            scaler: The AMP grad scaler, if any.
            probing: Whether this is a probing step.

        Returns:
            A float32 tensor of shape ``(L,)`` on :attr:`device`; non-finite where a gradient is.
        """
        scale_sq = _grad_scale(scaler).square()
        present = [i for i, p in enumerate(self._measured_params) if p.grad is not None]
        grads = [self._measured_params[i].grad for i in present]
        layer_sq = grouped_sq_norms(grads, self._group_index(tuple(present)), self.num_layers)
        if _unscales_in_step(optimizer):
            layer_sq = layer_sq / scale_sq
        if probing:
            layer_sq = layer_sq + self._probe_sq / scale_sq
            self._probe_sq.zero_()
            _record_scaler_inf_check(scaler, optimizer)
            for params in (*self._layer_params, self._always_on_params):
                for p in params:
                    p.grad = None
        return layer_sq

    def step_is_finite(self, layer_sq: Tensor, optimizer: Optimizer, scaler: torch.amp.GradScaler | None) -> Tensor:
        """A device boolean: no layer's gradient was NaN or Inf, and the grad scaler did not skip the step."""
        finite = torch.isfinite(layer_sq).all()
        found_inf = _scaler_found_inf(scaler, optimizer, layer_sq.device)
        return finite if found_inf is None else finite & (found_inf == 0)

    def add_to_window(self, layer_sq: Tensor, step_is_finite: Tensor) -> None:
        """Add a step's squared norms of the active layers to the open window; a non-finite step adds nothing.

        Device ops only; :meth:`close_window` reads the sums.
        """
        include = self.active_mask & step_is_finite
        step = torch.stack([step_is_finite.to(torch.float32), torch.where(include, layer_sq, 0.0).sum()])
        self._window += step.to(self._window.device)

    def close_window(self) -> tuple[int, bool]:
        """Finite steps in the window and whether any active layer had a non-zero gradient in them; then reset.

        One host read. Zero steps mean every step of the window was skipped as non-finite.
        """
        steps, sq_sum = self._window.tolist()
        self._window.zero_()
        return int(steps), sq_sum > 0

    def skip_if_non_finite(
        self, layer_sq: Tensor, optimizer: Optimizer, scaler: torch.amp.GradScaler | None, step: int
    ) -> bool:
        """Warn about layers with NaN/Inf gradients and empty every gradient, so the optimizer step is a no-op.

        The grad scaler skips such steps by itself under fp16; then only the warning is added. This reads one
        boolean on the host.

        Returns:
            Whether the step is skipped.
        """
        bad = ~torch.isfinite(layer_sq)
        if not bool(bad.any()):
            return False
        rank_zero_warn(non_finite_message(step, self._describe(bad.nonzero().flatten().tolist())))
        if scaler is None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        return True

    def note_scaled_step(self, layer_sq: Tensor, optimizer: Optimizer, scaler: torch.amp.GradScaler, step: int) -> None:
        """Under an enabled grad scaler, keep this step's non-finite check on the device for a later read.

        The scaler skips a step whose gradients are not finite by itself, from its own check (``found_inf``),
        so nothing needs deciding on the host now: :meth:`read_scaled_skips` reports the steps it skipped, in
        the read that closes a window. No host synchronisation here.
        """
        found_inf = _scaler_found_inf(scaler, optimizer, layer_sq.device)
        bad = ~torch.isfinite(layer_sq)
        skipped = bad.any() if found_inf is None else found_inf != 0
        self._scaled_steps.append((step, torch.cat([skipped.reshape(1), bad])))

    def read_scaled_skips(self) -> list[tuple[int, list[int]]]:
        """The noted steps that the grad scaler skipped, each with its non-finite layers; one host read.

        The notes are then forgotten.
        """
        if not self._scaled_steps:
            return []
        steps = [step for step, _ in self._scaled_steps]
        rows = torch.stack([flags for _, flags in self._scaled_steps]).tolist()
        self._scaled_steps.clear()
        return [
            (step, [layer for layer, bad in enumerate(row[1:]) if bad])
            for step, row in zip(steps, rows, strict=True)
            if row[0]
        ]

    def weight_sq_norms(self, layers: Sequence[int]) -> Tensor:
        """``||w^(l)||^2`` of each of ``layers``' managed parameters, zero for the other layers.

        The scale that ``importance="relative"`` divides the gradient norm by. One batched norm, no host sync.
        """
        key = tuple(layers)
        cached = self._weight_index_cache.get(key)
        if cached is None:
            params = [p for layer in layers for p in self._layer_params[layer]]
            groups = [layer for layer in layers for _ in self._layer_params[layer]]
            cached = (params, torch.tensor(groups, dtype=torch.long).to(self.device))
            self._weight_index_cache = {key: cached}
        params, index = cached
        return grouped_sq_norms([p.detach() for p in params], index, self.num_layers)

    def _group_index(self, present: tuple[int, ...]) -> Tensor:
        """Layer index of the measured parameters that have a gradient, cached so that no step copies it."""
        index = self._group_index_cache.get(present)
        if index is None:
            groups = torch.tensor([self._measured_groups[i] for i in present], dtype=torch.long)
            index = groups.to(self.device)
            self._group_index_cache[present] = index
        return index

    def _on_probe_grad(self, layer: int, param: Tensor) -> None:
        """Fold one parameter's accumulated gradient into the probe norms, then free it."""
        if not self.micro_batch_closes_step:
            return
        # Hooks measure only on one process, where a DTensor's (FSDP2's) local part is the whole gradient.
        self._probe_sq[layer] += torch.linalg.vector_norm(local_part(param.grad), dtype=torch.float32).square()
        if self._free_probe_grads:
            param.grad = None


def _unscales_in_step(optimizer: Optimizer) -> bool:
    """Fused optimizers unscale inside ``step()``: Lightning then skips ``unscale_`` and the hook sees scaled grads."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


def _scaler_found_inf(scaler: torch.amp.GradScaler | None, optimizer: Optimizer, device: torch.device) -> Tensor | None:
    """The grad scaler's own non-finite check of this step (a device tensor), if it has made one yet.

    ``unscale_`` records it before ``on_before_optimizer_step``; ``scaler.step`` skips the step when it is
    non-zero. Optimizers that unscale inside ``step()`` have no record yet, and ``None`` is returned.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return sum(value.to(device) for value in found.values()) if found else None


def _record_scaler_inf_check(scaler: torch.amp.GradScaler | None, optimizer: Optimizer) -> None:
    """Let the grad scaler check this step's gradients before probing removes them.

    For optimizers that unscale inside ``step()``, Lightning does not call ``unscale_`` and the scaler checks
    gradients inside ``scaler.step``. Probing removes the gradients first, and ``scaler.update`` would then
    fail for want of a check, so the check is made here, while the gradients still exist.
    """
    if scaler is not None and scaler.is_enabled() and _unscales_in_step(optimizer):
        scaler.unscale_(optimizer)


def _grad_scale(scaler: torch.amp.GradScaler | None) -> Tensor:
    """The AMP loss scale as a device tensor (read without a host sync), or 1 without a grad scaler."""
    if scaler is None or not scaler.is_enabled():
        return torch.ones(())
    return scaler._get_scale_async()


def non_finite_message(step: int, units: str) -> str:
    """The warning for an optimizer step skipped for non-finite gradients.

    Args:
        step: The optimizer step, 1-based.
        units: The units with a non-finite gradient as named in messages (``"layers [1]"``); empty when none of
            them had one (the non-finite gradient was outside the sampled units).
    """
    where = f" in {units}" if units else " (outside the sampled layers)"
    return (
        f"GRASS: optimizer step {step} has non-finite gradients{where}; the step is skipped (no parameter or "
        "optimizer state changes) and left out of the importance estimate"
    )
