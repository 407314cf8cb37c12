"""``GRASSCallback``: decides which transformer layers (or modules inside them) train at each optimizer step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_grass.errors import NothingToTrainError, SettingValueError
from lightning_grass.sampling.config import GRASSConfig
from lightning_grass.sampling.distribution import (
    effective_layers,
    sample_layers,
    sample_within_budget,
    sampling_probabilities,
    selection_counts,
    uniform_probabilities,
)
from lightning_grass.sampling.gradient_measurement import LayerGradientMeter, non_finite_message
from lightning_grass.sampling.importance import MeanGradNorm
from lightning_grass.sampling.layer_discovery import ALWAYS_ON_GROUPS, LayerMap, discover_layers
from lightning_grass.sampling.layer_listener import ActiveLayerListener
from lightning_grass.sampling.resume_changes import resume_warnings
from lightning_grass.sampling.sampling_metrics import log_record_metrics
from lightning_grass.sampling.sampling_units import SamplingUnits, sampling_units
from lightning_grass.strategy_support import check_strategy_supports_grass


class GRASSCallback(Callback):
    r"""Train only ``n_active`` transformer layers at a time, chosen by gradient-based importance sampling.

    The optimizer is built by your ``configure_optimizers`` over all parameters, as usual. At fit start the
    callback finds the layers (:func:`~lightning_grass.discover_layers`) and freezes all but the active ones
    by toggling ``requires_grad``: frozen layers get no gradient, so the optimizer skips them, weight decay
    included. In ``grass`` mode:

    1. **Probing** (``probe_steps`` optimizer steps): every layer gets a full backward, its gradient RMS is
       added to the mean gradient norm (MGN) accumulators, and the gradient is then freed, so probing holds
       no more gradient memory than training does. No parameter changes and no optimizer state is created.
    2. **Adaptive fine-tuning**: every ``sample_every`` steps, ``n_active`` distinct layers are drawn from
       ``softmax(normalize(MGN) / temperature)``. Every ``update_every`` steps the MGN of the layers that
       were active in the window is refreshed with an EMA; frozen layers keep their stale value.

    ``grass_static`` stops refreshing after probing (GRASS*), ``lisa`` samples uniformly without probing
    (the LISA baseline), and ``fixed`` trains ``fixed_layers`` only.

    ``unit="module"`` samples the weight matrices inside the layers instead of whole layers (as MISA does): the
    attention projections and MLP matrices of every block (:mod:`~lightning_grass.sampling.sampling_units` says
    which modules count, and why the norms stay frozen). Every step above is the same per module: probing measures
    each module's MGN, the EMA refreshes the active modules', and each draw takes modules without replacement from
    the softmax until a parameter budget is full: what the ``n_active`` largest layers hold
    (:attr:`parameter_budget`), so that a layer-wise and a module-wise run train, hold gradients for and keep
    optimizer state of at most the same number of parameters. ``grass_static`` and ``lisa`` draw modules the same
    way; ``fixed`` names layers and takes ``unit="layer"`` only.

    When one layer's importance dwarfs the others', the softmax gives it most of the probability and sampling
    degenerates to "that layer plus uniform". Each history record therefore carries the effective number of
    layers, ``exp(entropy(p))``, and each layer's share of the draws so far. Four options keep ``p`` following
    importance without collapsing (:mod:`~lightning_grass.sampling.distribution` explains each):
    ``normalize="rank"`` (only the order counts) or ``"log"`` (``p`` proportional to ``m ** (1 / temperature)``);
    ``target_effective_layers`` (a temperature chosen at each resample for that spread); ``max_probability``
    (a cap); and ``importance="relative"`` (gradient norm over weight norm, so a layer with large weights
    does not look important for its scale alone). ``normalize="none"`` is the paper's formula exactly.

    Only parameters that require grad when fit starts are managed: a layer you froze yourself, or the base
    weights of a ``peft`` model, stay frozen. At the end of fit, managed parameters are trainable again. A layer
    with no parameter that requires grad is left out of probing and sampling, with one warning naming it: its
    probability is exactly 0, its importance is reported as 0.0, and ``n_active`` is checked against the
    trainable layers only. Layer indices stay the model's own everywhere.

    Two failures that would otherwise train nothing in silence are caught. A probe or a sampling window at whose
    end no active layer received any gradient (all missing or exactly zero; typically reentrant gradient
    checkpointing without input gradients) raises :class:`~lightning_grass.errors.NothingToTrainError`. A run
    whose last step (``trainer.max_steps``, or ``trainer.estimated_stepping_batches`` where ``max_epochs`` ends
    it) is at or before the end of probing, so that no step would train, raises
    :class:`~lightning_grass.errors.SettingValueError` at train start, before any step; one that ends within
    the first sampling window gets a warning.

    Gradients are measured on optimizer-step boundaries, after gradient accumulation and AMP unscaling, before
    clipping (:class:`~lightning_grass.sampling.gradient_measurement.LayerGradientMeter`). The measurement uses batched
    tensor ops and no host synchronisation; the host reads the accumulators only when it refreshes or
    resamples, or when a window ends. A step with a non-finite layer gradient, or one the grad scaler skips,
    adds nothing to MGN. With ``skip_non_finite``, such a step is skipped and its number kept in
    :attr:`skipped_steps`. Under an enabled grad scaler (``16-mixed``) the scaler skips it by its own check,
    and the callback reads that check with the window's (the warning comes at the window's end); otherwise
    (fp32, bf16) deciding to skip reads one boolean on the host per step.

    Resuming from a checkpoint with another ``mode`` is refused. Any other setting that differs from the
    checkpoint's gets one warning line that says when its new value applies
    (:func:`~lightning_grass.sampling.resume_changes.resume_warnings`).

    With ``Trainer(strategy="grass")`` (:class:`~lightning_grass.GRASSStrategy`), the states of deactivated
    layers are kept off the device and a layer drawn again resumes its moments. With any other strategy they
    are dropped, so that deactivated layers hold no memory, and a layer drawn again restarts its moments.

    Args:
        n_active: gamma, layers trained at once.
        mode: ``"grass"``, ``"grass_static"``, ``"lisa"`` or ``"fixed"``.
        unit: ``"layer"`` (whole transformer layers, the paper's method) or ``"module"`` (the weight matrices
            inside them, under the parameter budget of ``n_active`` layers).
        probe_steps: T_p, optimizer steps of probing (``grass`` and ``grass_static``).
        sample_every: T_s, optimizer steps between resamples.
        update_every: T_u, optimizer steps between MGN refreshes; ``None`` means ``sample_every``.
        temperature: tau of the softmax.
        ema: alpha, weight of the newest window in the MGN refresh, in ``(0, 1]``.
        normalize: ``"mean"``, ``"max"``, ``"none"``, ``"rank"`` or ``"log"``: how importance is scaled before
            the softmax.
        importance: ``"mgn"`` (the paper's mean gradient norm) or ``"relative"`` (gradient norm over weight
            norm).
        target_effective_layers: Choose the temperature at each resample for this effective number of layers.
        max_probability: Cap on any layer's probability.
        layers: Dotted path of the block container, overriding discovery; several joined by commas are pooled.
        fixed_layers: Layer indices for ``mode="fixed"``.
        train_embeddings: Keep embeddings (modules before the blocks) trainable.
        train_head: Keep the LM head trainable. A head tied to the token embedding (Gemma, GPT-2) is one tensor
            with it and follows ``train_embeddings``; a disagreement is warned about at fit start.
        train_final_norm: Keep the final norm trainable.
        train_towers: Train vision and audio towers and projectors (the ``towers`` group) at every step; frozen
            by default.
        seed: Seed of the sampling generator; ``None`` takes ``torch.initial_seed()`` at fit start.
        skip_non_finite: Warn and skip the optimizer step when a layer's gradient holds NaN or Inf.

    See :class:`~lightning_grass.sampling.config.GRASSConfig` for each default and the reason for it.

    Attributes:
        units: The :class:`~lightning_grass.sampling.sampling_units.SamplingUnits` drawn from (set at fit start):
            the layers, or the modules with their names and layers. Importance, probabilities, draw shares and
            ``active_units`` index them; with ``unit="layer"`` unit ``i`` is layer ``i``.
        active_units: Indices of the units training now (every trainable unit while probing).
        active_layers: The layers that hold an active unit (with ``unit="layer"``, :attr:`active_units`).
        parameter_budget: With ``unit="module"``, the most parameters one draw may hold: those of the ``n_active``
            largest layers (their parameters that require grad when fit starts); ``None`` with ``unit="layer"``.
        importance: Per-unit MGN on the CPU, ``None`` until probing ends and in ``lisa``/``fixed`` modes.
        probabilities: Sampling distribution over the units on the CPU, sums to 1.
        phase: ``"probe"`` or ``"train"``.
        history: One record per resample or refresh: ``step``, ``active_units``, ``active_layers``, ``importance``,
            ``probabilities``, ``resampled``, ``refreshed``, ``effective_layers`` (``exp(entropy(p))``: the
            effective number of units, ``None`` in ``fixed`` mode), ``draw_share`` (each unit's share of the draws
            so far, this record's included) and ``trained`` (whether an optimizer step ran after the record, with
            its ``active_units``; ``False`` for a draw at the run's last step). Only the windows of resampled
            records that trained count in
            :func:`~lightning_grass.sampling.distribution.selection_counts`, :attr:`draw_share` and
            :meth:`trainable_parameters_per_step`. Each record goes to the Trainer's loggers as the metrics of
            :func:`~lightning_grass.sampling.sampling_metrics.metrics_of_record`.
        skipped_steps: The optimizer steps (1-based, as in the warnings) skipped because a layer's gradient was
            non-finite; kept in checkpoints.

    Example::

        import lightning as L
        import lightning_grass

        trainer = L.Trainer(max_steps=500, callbacks=[lightning_grass.GRASSCallback(n_active=2)])
        trainer.fit(model)  # a LightningModule holding a Hugging Face causal LM
    """

    def __init__(
        self,
        n_active: int = 2,
        mode: str = "grass",
        unit: str = "layer",
        probe_steps: int = 10,
        sample_every: int = 25,
        update_every: int | None = None,
        temperature: float = 1.0,
        ema: float = 0.5,
        normalize: str = "mean",
        importance: str = "mgn",
        target_effective_layers: float | None = None,
        max_probability: float | None = None,
        layers: str | None = None,
        fixed_layers: Sequence[int] | None = None,
        train_embeddings: bool = True,
        train_head: bool = True,
        train_final_norm: bool = True,
        train_towers: bool = False,
        seed: int | None = None,
        skip_non_finite: bool = True,
    ) -> None:
        self.config = GRASSConfig(
            mode=mode,
            unit=unit,
            n_active=n_active,
            probe_steps=probe_steps,
            sample_every=sample_every,
            update_every=update_every,
            temperature=temperature,
            ema=ema,
            normalize=normalize,
            importance=importance,
            target_effective_layers=target_effective_layers,
            max_probability=max_probability,
            layers=layers,
            fixed_layers=fixed_layers,
            train_embeddings=train_embeddings,
            train_head=train_head,
            train_final_norm=train_final_norm,
            train_towers=train_towers,
            seed=seed,
            skip_non_finite=skip_non_finite,
        )
        self.layer_map: LayerMap | None = None
        self.units: SamplingUnits | None = None
        self.active_units: list[int] = []
        self.parameter_budget: int | None = None
        self.importance: Tensor | None = None
        self.probabilities: Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.skipped_steps: list[int] = []
        self._optimizer_steps = 0
        self._train_start: int | None = None if self.config.probes else 0
        self._draw_counts: list[int] = []
        self._window_start = 0
        self._step_pending = False
        self._generator = torch.Generator()
        self._mgn: MeanGradNorm | None = None
        self._meter: LayerGradientMeter | None = None
        self._state_to_restore: dict[str, Any] | None = None
        self._optimizer: Optimizer | None = None
        self._listener: ActiveLayerListener | None = None
        self._unit_params: list[list[nn.Parameter]] = []
        self._always_on_params: list[nn.Parameter] = []
        self._frozen_params: list[nn.Parameter] = []

    @property
    def phase(self) -> str:
        """``"probe"`` until probing ends (never in ``lisa`` and ``fixed`` modes), then ``"train"``."""
        return "probe" if self._train_start is None else "train"

    @property
    def active_layers(self) -> list[int]:
        """The layers that hold an active unit, ascending (with ``unit="layer"``, the active layers)."""
        return self.units.layers_of(self.active_units) if self.units is not None else []

    @property
    def draw_share(self) -> list[float] | None:
        """Each unit's share of the draws whose window trained, over the whole run; ``None`` before one trained.

        A draw made at the run's last step, after which no step ran, is left out (its record has
        ``trained=False``). A history record's own ``draw_share`` counts its draw as soon as it is made.
        """
        total = sum(self._draw_counts)
        return [count / total for count in self._draw_counts] if total else None

    def trainable_parameters_per_step(self) -> int:
        """The most parameters trained at one optimizer step of this run.

        That is the always-on parameters this callback trains (embeddings, head and final norm as
        ``train_embeddings``, ``train_head`` and ``train_final_norm`` say; a tied head once, with the embeddings),
        plus the largest active set among the windows that trained (the resampled records of :attr:`history`
        with ``trained``). It is the maximum over the windows actually drawn rather than the ``n_active`` largest
        layers: the two differ where layers differ in size, where the user froze part of a layer, and with
        ``unit="module"``, whose draws stop short of :attr:`parameter_budget` by less than one module. Parameters
        frozen before fit count nowhere. Probing steps update nothing and are not counted.

        Returns:
            The count, equal to the parameters that require grad at that step; 0 before fit and while no window
            has trained (a run that ended while probing).
        """
        sizes = self._unit_sizes
        windows = [sum(sizes[i] for i in r["active_units"]) for r in self.history if r["resampled"] and r["trained"]]
        if not windows:
            return 0
        return sum(p.numel() for p in self._always_on_params) + max(windows)

    @property
    def _measures_steps(self) -> bool:
        return self.config.mode == "grass" or self.phase == "probe"

    @property
    def _trainable_units(self) -> list[int]:
        """The units that have a managed parameter: the only ones probed and drawn."""
        return [index for index, params in enumerate(self._unit_params) if params]

    @property
    def _eligible(self) -> list[int] | None:
        """:attr:`_trainable_units` for the sampling functions, ``None`` when that is every unit."""
        trainable = self._trainable_units
        return None if len(trainable) == len(self._unit_params) else trainable

    @property
    def _unit_sizes(self) -> list[int]:
        return [sum(p.numel() for p in params) for params in self._unit_params]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy_supports_grass(trainer.strategy)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise SettingValueError(
                f"GRASSCallback needs exactly one optimizer, got {len(trainer.optimizers)} from configure_optimizers"
            )
        state = self._state_to_restore or (self.state_dict() if self._mgn is not None else None)
        self._state_to_restore = None
        config = self.config
        self.layer_map = discover_layers(pl_module, config.layers)
        self.units = sampling_units(self.layer_map, config.unit)
        managed = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self._collect_parameters(managed)
        device = self._unit_params_device()
        layer_sizes = [
            sum(p.numel() for p in self.layer_map.layer_parameters(index) if id(p) in managed)
            for index in range(self.layer_map.num_layers)
        ]
        untrainable = [index for index, size in enumerate(layer_sizes) if not size]
        config.check_num_layers(self.layer_map.num_layers, untrainable, self._module_count())
        if config.unit == "module":
            self.parameter_budget = sum(sorted(layer_sizes, reverse=True)[: config.n_active])
        self._check_optimizer_covers(pl_module, trainer.optimizers[0])
        strategy = trainer.strategy
        self._listener = strategy if isinstance(strategy, ActiveLayerListener) else None
        if self._listener is not None:
            self._listener.on_layer_map(self.layer_map, self.units)
        self._optimizer = trainer.optimizers[0]
        self._mgn = MeanGradNorm(torch.tensor(self._unit_sizes), device=device)
        self._meter = LayerGradientMeter(
            self._unit_params,
            self._always_on_params,
            device,
            use_probe_hooks=trainer.world_size == 1,
            free_probe_grads=bool(self._always_on_params) or _grad_scaler(trainer) is None,
            describe=self.units.describe,
        )
        if untrainable:
            rank_zero_warn(
                f"GRASS: layers {untrainable} have no parameter that requires grad (frozen before fit); they are "
                f"left out of probing and sampling, and n_active={config.n_active} is drawn from the other "
                f"{self.layer_map.num_layers - len(untrainable)} layers"
            )
        self._draw_counts = [0] * len(self.units)
        if state is not None:
            self._restore(trainer, state)
        else:
            self._start(trainer)
        self._window_start = self._optimizer_steps
        kind = config.unit
        states = (
            f"{type(strategy).__name__} keeps the optimizer states of deactivated {kind}s"
            if self._listener is not None
            else f"Optimizer states of deactivated {kind}s are dropped, and a {kind} drawn again restarts its "
            "moments; Trainer(strategy='grass') keeps them off the device instead"
        )
        if kind == "module":
            drawn = (
                f"modules drawn up to {self.parameter_budget:,} parameters (what {config.n_active} layers hold) from "
                f"{len(self._trainable_units)} modules of {self.layer_map.num_layers} layers; the blocks' "
                f"{len(self.units.left_out)} norm and vector parameters stay frozen"
            )
        else:
            drawn = f"{config.n_active} of {self.layer_map.num_layers} layers active"
        rank_zero_info(
            f"GRASS: mode={config.mode}, {drawn} (blocks at '{self.layer_map.path}', found by "
            f"{self.layer_map.found_by}). {states}."
        )
        self._report_layout()
        half = [p for params in self._unit_params for p in params if p.dtype in (torch.bfloat16, torch.float16)]
        if half and self._listener is None:
            rank_zero_warn(
                f"GRASS: {len(half)} layer parameters are {half[0].dtype} and {type(strategy).__name__} steps them in "
                "that dtype, where AdamW updates smaller than half a bf16 step are rounded away. "
                "Trainer(strategy='grass') steps them on fp32 master weights"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here the training data is set up and its resumed state loaded, so the number of steps can be read.
        if self.phase == "probe":
            self._check_probing_ends_in_time(trainer)
        # A resume loads the optimizer state after on_fit_start; drop what it brought for inactive units.
        if self._listener is None:
            self._drop_optimizer_states(set(range(len(self.units))) - set(self.active_units))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning's own rule for whether this micro-batch ends in an optimizer step.
        self._meter.micro_batch_closes_step = not trainer.fit_loop.epoch_loop._should_accumulate()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._step_pending = True
        assert self._mgn is not None and self._meter is not None
        scaler = _grad_scaler(trainer)
        layer_sq = self._meter.read_step(optimizer, scaler, probing=self.phase == "probe")
        step = self._optimizer_steps + 1
        if self.config.skip_non_finite:
            if scaler is not None and scaler.is_enabled():
                self._meter.note_scaled_step(layer_sq, optimizer, scaler, step=step)
            elif self._meter.skip_if_non_finite(layer_sq, optimizer, scaler, step=step):
                self.skipped_steps.append(step)
        step_is_finite = self._meter.step_is_finite(layer_sq, optimizer, scaler)
        self._meter.add_to_window(layer_sq, step_is_finite)
        if self._measures_steps:
            scale_sq = None
            if self.config.importance == "relative":
                scale_sq = self._meter.weight_sq_norms(self.active_units)
            self._mgn.accumulate(layer_sq, self._meter.active_mask, step_is_finite, scale_sq)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._step_pending:
            return
        self._step_pending = False
        self._optimizer_steps += 1
        if self.phase == "train":
            self._mark_window_trained()
        self._on_optimizer_step_done(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.layer_map is None:
            return
        self._report_scaled_skips()
        self._meter.stop_probe_hooks()
        for params in (*self._unit_params, self._always_on_params, self._frozen_params):
            for p in params:
                p.requires_grad_(True)

    @override
    def state_dict(self) -> dict[str, Any]:
        """What cannot be derived: the MGN accumulators, the generator, the draws so far and the step counters.

        The phase follows from ``train_start_step`` (``None`` while probing); importance is the MGN tracker's;
        the probabilities are computed from it and the config at resume, as they were during the run.
        """
        self._report_scaled_skips()
        return {
            "format": _STATE_FORMAT,
            "config": dataclasses.asdict(self.config),
            "optimizer_steps": self._optimizer_steps,
            "active_units": list(self.active_units),
            "history": self.history,
            "generator": self._generator.get_state(),
            "mgn": self._mgn.state_dict() if self._mgn is not None else None,
            "skipped_steps": list(self.skipped_steps),
            "train_start_step": self._train_start,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's state for fit start; refuse one written with another ``mode`` or ``unit``.

        Checkpoints written before the state held only what cannot be derived load too (they also stored the
        phase, importance and probabilities: the phase is read from them, the rest is derived again), and so do
        those written before ``skipped_steps`` and ``train_start_step`` were saved: no step was counted as
        skipped, and training started at the end of probing by their own ``probe_steps``.
        """
        saved = {"unit": "layer", **state_dict["config"]}  # checkpoints written before `unit` sampled layers
        for name, what in (("mode", "mode"), ("unit", "unit (the importance, draws and history index its units)")):
            value, ours = saved[name], getattr(self.config, name)
            if value != ours:
                raise SettingValueError(
                    f"the checkpoint was written by GRASSCallback({name}={value!r}), this one has {name}={ours!r}; "
                    f"resume with the same {what}"
                )
        self._state_to_restore = state_dict

    def _start(self, trainer: pl.Trainer) -> None:
        seed = self.config.seed if self.config.seed is not None else torch.initial_seed()
        self._generator.manual_seed(trainer.strategy.broadcast(seed, src=0))
        if self.phase == "probe":
            self._activate(self._trainable_units)
            self._meter.start_probe_hooks()
            return
        if self.config.mode == "fixed":
            self._activate(list(self.config.fixed_layers))
        else:
            self.probabilities = uniform_probabilities(len(self.units), self._eligible)
            self._resample(trainer)
        self._record(trainer, resampled=True, refreshed=False)

    def _restore(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (see :meth:`load_state_dict` for the formats it reads).

        Records written before ``trained`` was kept get it from their step: every record but one made at the
        checkpoint's own step was followed by a step. In ``fixed`` mode, other ``fixed_layers`` than the
        checkpoint's are a new window, recorded at the resumed step.
        """
        assert self._mgn is not None
        if state["mgn"] is not None:
            self._mgn.load_state_dict(state["mgn"])
        self._optimizer_steps = state["optimizer_steps"]
        self._train_start = _train_start_of(state)
        self.history = list(state["history"])
        for record in self.history:
            record.setdefault("trained", record["step"] < self._optimizer_steps)
            record.setdefault("active_units", record["active_layers"])  # written before modules could be drawn
        self._draw_counts = selection_counts(self.history, len(self.units))
        self.skipped_steps = list(state.get("skipped_steps", []))
        self._generator.set_state(state["generator"])
        self.active_units = list(state.get("active_units", state.get("active_layers")))
        if self.config.mode == "fixed" and list(self.config.fixed_layers) != self.active_units:
            self._activate(list(self.config.fixed_layers))
            self._record(trainer, resampled=True, refreshed=False)
        else:
            self._activate(self.active_units)
        if self.phase == "probe":
            self._meter.start_probe_hooks()
        elif self.config.probes:
            self._set_importance(self._mgn.importance)
        elif self.config.mode == "lisa":
            self.probabilities = uniform_probabilities(len(self.units), self._eligible)
        for message in resume_warnings(state["config"], self.config, self._optimizer_steps, self._train_start):
            rank_zero_warn(message)

    def _on_optimizer_step_done(self, trainer: pl.Trainer) -> None:
        assert self._mgn is not None
        config = self.config
        if self.phase == "probe":
            if self._optimizer_steps < config.probe_steps:
                return
            self._check_gradients_reached_layers("probing")
            self._meter.stop_probe_hooks()
            self._train_start = self._optimizer_steps
            self._set_importance(self._mgn.initialize())
            self._resample(trainer)
            self._record(trainer, resampled=True, refreshed=True)
            return
        steps = self._optimizer_steps - self._train_start
        if steps % config.sample_every == 0:
            self._check_gradients_reached_layers("a training window")
        refreshed = config.mode == "grass" and steps % config.refresh_every == 0
        resampled = config.mode != "fixed" and steps % config.sample_every == 0
        if refreshed:
            self._set_importance(self._mgn.refresh(config.ema))
        if resampled:
            self._resample(trainer)
        if refreshed or resampled:
            self._record(trainer, resampled=resampled, refreshed=refreshed)

    def _mark_window_trained(self) -> None:
        """After a training step: the window of the last record has trained; count its draw once."""
        record = self.history[-1]
        if record["trained"]:
            return
        record["trained"] = True
        if record["resampled"]:
            for unit in record["active_units"]:
                self._draw_counts[unit] += 1

    def _set_importance(self, importance: Tensor) -> None:
        config = self.config
        self.importance = importance.cpu()
        self.probabilities = sampling_probabilities(
            self.importance,
            config.temperature,
            config.normalize,
            config.target_effective_layers,
            config.max_probability,
            self._eligible,
        )

    def _resample(self, trainer: pl.Trainer) -> None:
        assert self.probabilities is not None
        if self.parameter_budget is None:
            units = sample_layers(self.probabilities, self.config.n_active, self._generator, self._eligible)
        else:
            units = sample_within_budget(
                self.probabilities, self._unit_sizes, self.parameter_budget, self._generator, self._eligible
            )
        self._activate(trainer.strategy.broadcast(units, src=0))

    def _check_gradients_reached_layers(self, window: str) -> None:
        """At the end of a probe or window: refuse to go on when no gradient reached any active layer in it.

        A window whose every step was skipped as non-finite is not judged: those steps are in :attr:`skipped_steps`.
        Every rank reads the same all-reduced gradients, so under DDP all of them raise together.

        Raises:
            NothingToTrainError: If no active layer received a non-zero gradient in the window's finite steps.
        """
        assert self._meter is not None
        self._report_scaled_skips()
        first, last = self._window_start + 1, self._optimizer_steps
        self._window_start = last
        finite_steps, reached = self._meter.close_window()
        if finite_steps == 0 or reached:
            return
        raise NothingToTrainError(
            f"GRASS: no gradient reached any of the active {self.units.describe(self.active_units)} in {window} "
            f"(optimizer steps {first} to {last}): every gradient there was missing or exactly zero, so nothing "
            "learns. The usual cause is reentrant gradient checkpointing (use_reentrant=True, the transformers 4.x "
            f"default) with input gradients off and train_embeddings={self.config.train_embeddings}: when nothing "
            "before the blocks requires grad, no checkpointed block runs its backward. Fix: "
            'model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}), or call '
            "model.enable_input_require_grads() before fit. Otherwise check that the loss depends on the layers"
        )

    def _report_scaled_skips(self) -> None:
        """Warn about, and count, the steps the grad scaler skipped since the last read (one host read)."""
        if self._meter is None:
            return
        for step, units in self._meter.read_scaled_skips():
            rank_zero_warn(non_finite_message(step, self.units.describe(units) if units else ""))
            self.skipped_steps.append(step)

    def _check_probing_ends_in_time(self, trainer: pl.Trainer) -> None:
        """Refuse a run that stops before a step after probing; warn about one that stops within the first window.

        Called at train start while probing (``lisa`` and ``fixed`` train from the first step), before any step
        of this run. Probing ends at step ``probe_steps``, or at the next step of a run resumed past it, and
        updates nothing; the first window's layers are drawn then and train from the step after. The run's last
        step is ``trainer.max_steps``, or ``trainer.estimated_stepping_batches`` where ``max_epochs`` ends the
        run first; a run with neither bound (or an iterable dataset without a length) is not checked. A
        ``fast_dev_run``, a smoke test of the pipeline, is warned about rather than refused.

        Raises:
            SettingValueError: If the run's last step is at or before the end of probing, so that no parameter
                would be updated.
        """
        bound = _last_step(trainer)
        if bound is None:
            return
        last_step, by_epochs = bound
        config, step = self.config, self._optimizer_steps
        probe_end = max(config.probe_steps, step + 1)
        needed = probe_end + config.sample_every
        if by_epochs:
            limit = f"trainer.max_epochs={trainer.max_epochs} ({last_step} optimizer steps)"
            fix = f"trainer.max_epochs (or the batches per epoch) so that the run takes at least {needed} steps"
        else:
            limit = f"trainer.max_steps={last_step}"
            fix = f"trainer.max_steps to at least {needed}"
        where = f", and this run resumes at step {step}" if step else ""
        if last_step <= probe_end and trainer.fast_dev_run:
            rank_zero_warn(
                f"GRASS: fast_dev_run ends the run while probing (probe_steps={config.probe_steps}): the steps run "
                "the probe's hooks and update no parameter"
            )
            return
        if last_step <= probe_end:
            lower = f", or lower probe_steps to at most {last_step - 1}" if step + 1 < last_step else ""
            raise SettingValueError(
                f"GRASS: probe_steps={config.probe_steps} leaves no step to train within {limit}: probing updates "
                f"no parameter and runs until optimizer step {probe_end}{where}. Probing must end before the run's "
                f"last step: set {fix} (probing and one sampling window of sample_every={config.sample_every})"
                f"{lower}"
            )
        if last_step < needed:
            trained = last_step - probe_end
            rank_zero_warn(
                f"GRASS: {limit} with probe_steps={config.probe_steps} and sample_every={config.sample_every}: only "
                f"{trained} {'step trains' if trained == 1 else 'steps train'} after probing, fewer than one sampling "
                f"window, so only the {config.unit}s drawn at step {probe_end} ever train. Set {fix}, or lower "
                "probe_steps or sample_every"
            )

    def _activate(self, units: list[int]) -> None:
        """Make exactly ``units`` trainable, drop the optimizer state of units leaving the active set."""
        assert self._optimizer is not None and self._meter is not None
        leaving = set(self.active_units) - set(units)
        self.active_units = sorted(units)
        trained = {id(p) for index in units for p in self._unit_params[index]}  # a shared block's, once
        for params in self._unit_params:
            for p in params:
                p.requires_grad_(id(p) in trained)
                if id(p) not in trained:
                    p.grad = None
        if self._listener is not None:
            self._listener.on_active_units(self.active_units)
        else:
            self._drop_optimizer_states(leaving, keep=trained)
        self._meter.set_active(self.active_units, probing=self.phase == "probe")

    def _report_layout(self) -> None:
        """Say which stacks were not chosen, what the towers hold and whether they train, and any shared block."""
        layer_map = self.layer_map
        towers = layer_map.group_parameters("towers")
        if layer_map.other_stacks or towers:
            count = sum(p.numel() for p in towers)
            state = "train at every step (train_towers=True)" if self.config.train_towers else "are frozen"
            rank_zero_info(
                f"GRASS: not sampled: the stacks at {', '.join(repr(s) for s in layer_map.other_stacks) or 'none'}; "
                f"the towers ({len(layer_map.towers)} modules, {count:,} parameters: vision and audio encoders, "
                f"projectors) {state}"
            )
        if layer_map.shared:
            holders = sorted({indices for _, indices in layer_map.shared})
            rank_zero_info(
                f"GRASS: {len(layer_map.shared)} parameters are shared by several layers ({holders[0]}"
                f"{' and others' if len(holders) > 1 else ''}); each trains while any layer holding it is active, "
                "and its gradient counts in the MGN of every layer that holds it"
            )

    def _drop_optimizer_states(self, units: set[int], keep: frozenset[int] | set[int] = frozenset()) -> None:
        """Without a listener, remove the state of ``units``' parameters, but ``keep``'s (shared, still active)."""
        assert self._optimizer is not None
        for index in units:
            for p in self._unit_params[index]:
                if id(p) not in keep:
                    self._optimizer.state.pop(p, None)

    def _collect_parameters(self, managed: set[int]) -> None:
        """Split the parameters that require grad now into per-unit lists, the trained always-on set and the rest.

        The rest, frozen until fit ends, is the always-on groups this run does not train and, with
        ``unit="module"``, the blocks' parameters that no module unit holds (the norms).
        """
        self._unit_params = [[p for p in params if id(p) in managed] for params in self.units.parameters]
        flags = {
            "embeddings": self.config.train_embeddings,
            "head": self.config.train_head,
            "final_norm": self.config.train_final_norm,
            "towers": self.config.train_towers,
        }
        trained: dict[int, nn.Parameter] = {}
        frozen: dict[int, nn.Parameter] = {}
        for group in ALWAYS_ON_GROUPS:
            for p in self.layer_map.group_parameters(group):
                if id(p) in managed:
                    (trained if flags[group] else frozen)[id(p)] = p
        for tied in self.layer_map.tied:
            for other in tied.tied_to:
                if flags[other] != flags[tied.group]:
                    rank_zero_warn(
                        f"GRASS: {' and '.join(tied.names)} are one tied tensor; it trains with the {tied.group} "
                        f"(train_{tied.group}={flags[tied.group]}), so train_{other}={flags[other]} does not apply "
                        "to it"
                    )
        left_out = [p for p in self.units.left_out if id(p) in managed]
        self._frozen_params = [p for key, p in frozen.items() if key not in trained] + left_out
        for p in self._frozen_params:
            p.requires_grad_(False)
            p.grad = None
        self._always_on_params = list(trained.values())

    def _check_optimizer_covers(self, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        required = {id(p) for params in (*self._unit_params, self._always_on_params) for p in params}
        missing = [name for name, p in pl_module.named_parameters() if id(p) in required and id(p) not in in_optimizer]
        if missing:
            raise SettingValueError(
                f"the optimizer does not hold {len(missing)} trainable parameters that GRASS may train, for example "
                f"{missing[:3]}. Build the optimizer over all parameters in configure_optimizers (for example "
                "AdamW(self.parameters())): GRASSCallback freezes layers after the optimizer exists, so that every "
                "layer can be trained when it is drawn"
            )

    def _unit_params_device(self) -> torch.device:
        for params in self._unit_params:
            if params:
                return params[0].device
        what = "layer" if self.config.unit == "layer" else "module with a weight matrix in the layers"
        raise SettingValueError(
            f"no {what} at '{self.layer_map.path}' has a parameter that requires grad; GRASSCallback has nothing to "
            "train. Unfreeze the layers before fit"
        )

    def _module_count(self) -> int | None:
        """With ``unit="module"``, how many modules can be drawn (those with a parameter that requires grad)."""
        return len(self._trainable_units) if self.config.unit == "module" else None

    def _record(self, trainer: pl.Trainer, resampled: bool, refreshed: bool) -> None:
        record = {
            "step": self._optimizer_steps,
            "active_units": list(self.active_units),
            "active_layers": self.active_layers,
            "importance": None if self.importance is None else self.importance.tolist(),
            "probabilities": None if self.probabilities is None else self.probabilities.tolist(),
            "resampled": resampled,
            "refreshed": refreshed,
            "effective_layers": None if self.probabilities is None else effective_layers(self.probabilities),
        }
        self.history.append(record)
        draws = list(self._draw_counts)  # the windows that trained, and this draw, whose window starts now
        if resampled:
            for unit in self.active_units:
                draws[unit] += 1
        total = sum(draws)
        record["draw_share"] = [count / total if total else 0.0 for count in draws]
        record["trained"] = False
        log_record_metrics(trainer.loggers, record, self.config.unit)


#: The layout of :meth:`GRASSCallback.state_dict`: 3 names the active units (``active_units``; 1 and 2 named
#: ``active_layers``, the only units then); 2 holds only what cannot be derived (1 also held the phase, importance
#: and probabilities).
_STATE_FORMAT = 3


def _train_start_of(state: dict[str, Any]) -> int | None:
    """The step training started at in a checkpoint's state, ``None`` while probing, for every format written.

    Checkpoints from before :data:`_STATE_FORMAT` 2 stored the phase; the oldest did not store the start, which
    was the end of probing by their own ``probe_steps`` (0 in the modes that do not probe).
    """
    saved = state["config"]
    if state.get("format", 1) < 2 and state["phase"] == "probe":
        return None
    if "train_start_step" in state:
        return state["train_start_step"]
    return saved["probe_steps"] if saved["mode"] in ("grass", "grass_static") else 0


def _last_step(trainer: pl.Trainer) -> tuple[int, bool] | None:
    """The optimizer step a fit stops at, and whether ``max_epochs`` decides it; ``None`` when there is no bound.

    ``max_steps`` is read as given. The number of steps that ``max_epochs`` allows needs the training data, so it
    is read only where ``max_epochs`` is set, from Lightning's ``estimated_stepping_batches`` (which counts
    gradient accumulation and ``limit_train_batches``, and is ``max_steps`` when that comes first).
    ``max_steps=0`` trains nothing whatever the callback does, and is not the callback's to report.
    """
    max_steps = trainer.max_steps
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        return (max_steps, False) if max_steps > 0 else None
    estimated = trainer.estimated_stepping_batches
    if not math.isfinite(estimated) or estimated <= 0:
        return None
    return int(estimated), estimated != max_steps


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    return getattr(trainer.precision_plugin, "scaler", None)
