"""``RunStats``: per-step time, optimizer-state bytes and peak memory of a run, for its summary."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_grass.offload import optimizer_state_bytes


class RunStats(Callback):
    """Records the wall time of each optimizer step and the largest optimizer state held on the device.

    Optimizer-state bytes on the device are the strategy's: a GRASS strategy's ``offload_stats`` counts them
    (``peak_resident_bytes``, which also sees states that are resident only during the step). Under another
    strategy (``strategy=auto``) every state is resident, and ``optimizer.state`` is counted after each step.

    Each validation during training adds ``(optimizer step, val/loss)`` to ``validation_curve``.

    Its checkpoint state is the run's last logged metrics (``train/loss``, ``val/*``) and the validation curve so
    far, so that a run resumed from a checkpoint still reports them (one of its last step trains no further).

    Attributes:
        restored_metrics: The metrics of the checkpoint a run resumed from; empty for a fresh run.
        validation_curve: ``[step, val/loss]`` pairs, one per validation during training, in order.
    """

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.peak_optimizer_state_bytes = 0
        self.restored_metrics: dict[str, float] = {}
        self.validation_curve: list[list[float]] = []
        self._start: float | None = None
        self._trainer: pl.Trainer | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def metrics(self) -> dict[str, float]:
        """The run's last logged metrics: those of this process, over those of the checkpoint it resumed from."""
        current = {} if self._trainer is None else self._trainer.callback_metrics
        return {**self.restored_metrics, **{name: float(value) for name, value in current.items()}}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics(), "validation_curve": [list(point) for point in self.validation_curve]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored_metrics = dict(state_dict.get("metrics", {}))
        self.validation_curve = [list(point) for point in state_dict.get("validation_curve", [])]

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None:
            return
        step = trainer.global_step
        self.validation_curve = [point for point in self.validation_curve if point[0] != step]
        self.validation_curve.append([step, float(loss)])

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self.step_seconds.append(time.perf_counter() - self._start)
        self._start = None
        stats = getattr(trainer.strategy, "offload_stats", None)
        if stats is not None:
            state_bytes = int(stats.get("peak_resident_bytes", 0))
        else:
            state_bytes = sum(optimizer_state_bytes(optimizer) for optimizer in trainer.optimizers)
        self.peak_optimizer_state_bytes = max(self.peak_optimizer_state_bytes, state_bytes)

    def summary(self, device: torch.device) -> dict[str, float]:
        """Median step time (s), peak optimizer-state bytes and peak memory (CUDA allocated, or process RSS)."""
        return {
            "median_step_seconds": statistics.median(self.step_seconds) if self.step_seconds else float("nan"),
            "optimizer_state_bytes_peak": self.peak_optimizer_state_bytes,
            "peak_memory_bytes": peak_memory_bytes(device),
        }


def peak_memory_bytes(device: torch.device) -> int:
    """``torch.cuda.max_memory_allocated`` on CUDA, otherwise the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
