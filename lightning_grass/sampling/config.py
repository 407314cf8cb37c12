"""The settings of :class:`~lightning_grass.GRASSCallback`, validated in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_grass.errors import SettingValueError
from lightning_grass.sampling.distribution import NORMALIZATIONS
from lightning_grass.sampling.sampling_units import UNITS
from lightning_grass.setting_checks import check_choice, check_flag, check_int, check_module_path, check_number

#: Sampling modes: adaptive GRASS, GRASS* (static importance), the LISA baseline, and a fixed layer list.
MODES = ("grass", "grass_static", "lisa", "fixed")

#: Importance signals: the paper's mean gradient norm, or the gradient norm relative to the weight norm.
IMPORTANCE_SIGNALS = ("mgn", "relative")


def check_n_active(n_active: object, num_layers: int | None = None, counted: str | None = None) -> None:
    """Refuse an ``n_active`` that is not an integer between 1 and the number of layers it is drawn from.

    :class:`GRASSConfig` and :func:`~lightning_grass.estimate_memory` check it here: the type and the lower bound
    at once, the upper bound once the model's layers are known.

    Args:
        n_active: The setting.
        num_layers: The layers it is drawn from; ``None`` (the model not known yet) checks the type and the lower
            bound only.
        counted: Those layers as the message names them; ``None`` is ``"layers (<num_layers>)"``.

    Raises:
        SettingTypeError: If ``n_active`` is not an int.
        SettingValueError: If it is below 1 or above ``num_layers``.
    """
    check_int("n_active", n_active, minimum=1)
    if num_layers is not None and n_active > num_layers:
        counted = counted or f"layers ({num_layers})"
        raise SettingValueError(f"n_active={n_active} must be between 1 and the number of {counted}")


@dataclass(frozen=True)
class GRASSConfig:
    """Layer-sampling settings, named after the paper. Every field is checked at construction.

    The number fields (``temperature``, ``ema``, ``target_effective_layers``, ``max_probability``) must be
    finite: NaN and infinity are refused. "The number of layers" below counts the trainable ones: a layer with
    no parameter that requires grad when fit starts (frozen by the user) is never probed or drawn.

    Attributes:
        mode: ``"grass"`` (adaptive: probe, then refresh importance with an EMA), ``"grass_static"`` (GRASS*:
            probe once, never refresh), ``"lisa"`` (uniform sampling, no probing) or ``"fixed"`` (train
            ``fixed_layers`` only).
        unit: What is sampled: ``"layer"`` (default: whole transformer layers, the paper's method) or
            ``"module"`` (the weight matrices inside them, drawn until they hold as many parameters as ``n_active``
            layers; see :mod:`~lightning_grass.sampling.sampling_units`). ``mode="fixed"`` takes layers only.
        n_active: gamma, how many layers train at once. Default 2: the smallest set that lets two
            consecutive layers adapt together; the paper finds larger gamma better, at more memory.
        probe_steps: T_p, optimizer steps of full backward at the start that measure every layer and update
            nothing; at least 1 in the ``grass`` modes (``lisa`` is the mode without probing), ignored in the
            others. Default 10: enough steps to average out batch noise, short next to a fine-tuning run.
        sample_every: T_s, optimizer steps between resamples. Default 25: the paper's best range is 25 to
            50, and T_s = 5 was too noisy.
        update_every: T_u, optimizer steps between importance refreshes. ``None`` (default) means
            ``sample_every``: each window's active layers are refreshed just before the next draw.
        temperature: tau of ``softmax(m / tau)``. Default 1.0 with ``normalize="mean"``: a layer twice as
            important as the average is ``e`` times as likely as an average one.
        ema: alpha, the weight of the newest window in the refresh. Default 0.5: old and new count equally,
            so one noisy window cannot swing the distribution.
        normalize: How importance is scaled before the softmax: ``"mean"`` (default), ``"max"``, ``"none"`` (the
            paper's formula), ``"rank"`` or ``"log"``; see
            :func:`~lightning_grass.sampling.distribution.normalize_importance`.
        importance: The per-layer signal. ``"mgn"`` (default) is the paper's mean gradient norm, the per-step
            gradient RMS of the layer. ``"relative"`` divides each step's gradient norm by the layer's weight
            norm, so that a layer whose weights are large (often the first, next to the embeddings) does not
            look important for its scale alone.
        target_effective_layers: Choose the temperature at each resample so that the effective number of
            layers, ``exp(entropy(p))``, equals this (between 1 and the number of layers); ``temperature`` is
            then unused. It keeps ``p`` as spread out as asked however peaked the importance is.
        max_probability: Cap on any layer's probability (between 1/L and 1); the excess is shared among the
            other layers in proportion to theirs. ``None`` (default) caps nothing.
        layers: Dotted path of the block container, overriding discovery, e.g. ``"model.model.layers"``; several
            paths joined by commas pool their blocks (``"model.encoder.block,model.decoder.block"``).
        fixed_layers: The layer indices to train in ``"fixed"`` mode; ``n_active`` is then their count.
        train_embeddings: Keep the modules before the blocks (token and position embeddings) trainable.
        train_head: Keep the LM head trainable; a head tied to the token embedding follows ``train_embeddings``.
        train_final_norm: Keep the final norm trainable. These three default to ``True``, as in LISA, so
            that GRASS and LISA differ only in how layers are chosen.
        train_towers: Train the ``towers`` group (vision and audio encoders, projectors: what is neither a block
            nor the text model's embeddings, head or final norm) at every step. ``False`` (default) freezes it:
            fine-tuning a vision-language model's language layers leaves its vision tower as it was, as most
            recipes do, and holds no gradient or optimizer state for it.
        seed: Seed of the layer-sampling generator. ``None`` (default) takes ``torch.initial_seed()`` at
            fit start, so ``lightning.seed_everything`` controls it.
        skip_non_finite: When a layer's gradient holds NaN or Inf, warn (naming the step and the layers) and
            skip the optimizer step, as the fp16 grad scaler does. Default ``True``: one NaN would otherwise
            poison the Adam moments of the active layers for good. It costs one host read per step.
            The skipped steps are listed in ``GRASSCallback.skipped_steps``.
    """

    mode: str = "grass"
    unit: str = "layer"
    n_active: int = 2
    probe_steps: int = 10
    sample_every: int = 25
    update_every: int | None = None
    temperature: float = 1.0
    ema: float = 0.5
    normalize: str = "mean"
    importance: str = "mgn"
    target_effective_layers: float | None = None
    max_probability: float | None = None
    layers: str | None = None
    fixed_layers: Sequence[int] | None = None
    train_embeddings: bool = True
    train_head: bool = True
    train_final_norm: bool = True
    train_towers: bool = False
    seed: int | None = None
    skip_non_finite: bool = True

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("unit", self.unit, UNITS)
        if self.unit == "module" and self.mode == "fixed":
            raise SettingValueError(
                "unit='module' with mode='fixed': fixed_layers names whole layers, so mode='fixed' takes "
                "unit='layer'; modules are drawn in the modes 'grass', 'grass_static' and 'lisa'"
            )
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_choice("importance", self.importance, IMPORTANCE_SIGNALS)
        if self.target_effective_layers is not None:
            check_number("target_effective_layers", self.target_effective_layers, ">= 1", lambda v: v >= 1)
        if self.max_probability is not None:
            check_number("max_probability", self.max_probability, "in (0, 1]", lambda v: 0 < v <= 1)
        check_int("probe_steps", self.probe_steps, minimum=1 if self.mode in ("grass", "grass_static") else 0)
        check_int("sample_every", self.sample_every, minimum=1)
        if self.update_every is not None:
            check_int("update_every", self.update_every, minimum=1)
        check_number("temperature", self.temperature, "> 0", lambda v: v > 0)
        check_number("ema", self.ema, "in (0, 1]", lambda v: 0 < v <= 1)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)
        for name in ("train_embeddings", "train_head", "train_final_norm", "train_towers", "skip_non_finite"):
            check_flag(name, getattr(self, name))
        check_module_path("layers", self.layers)
        if self.mode == "fixed":
            self._check_fixed_layers()
        else:
            if self.fixed_layers is not None:
                raise SettingValueError(
                    f"fixed_layers={list(self.fixed_layers)} is only used with mode='fixed', not {self.mode!r}"
                )
            check_n_active(self.n_active)

    @property
    def refresh_every(self) -> int:
        """T_u, with ``None`` resolved to ``sample_every``."""
        return self.sample_every if self.update_every is None else self.update_every

    @property
    def probes(self) -> bool:
        """Whether this mode starts with a probing phase."""
        return self.mode in ("grass", "grass_static")

    def check_num_layers(
        self, num_layers: int, untrainable: Sequence[int] = (), trainable_modules: int | None = None
    ) -> None:
        """Validate the settings that depend on the model.

        Layers with no parameter that requires grad are never probed or drawn, so the counts are checked against
        the trainable layers alone. With ``unit="module"``, ``n_active`` still counts layers (it sets the parameter
        budget), while ``target_effective_layers`` and ``max_probability`` describe the distribution over the
        modules and are checked against ``trainable_modules``.

        Args:
            num_layers: The model's number of layers.
            untrainable: Indices of the layers with no parameter that requires grad (frozen before fit).
            trainable_modules: With ``unit="module"``, the number of modules with a parameter that requires grad.

        Raises:
            SettingValueError: If ``n_active`` or ``target_effective_layers`` exceeds the number of trainable
                layers, a fixed layer is out of range or untrainable, or ``max_probability`` is below one over
                the number of trainable layers.
        """
        trainable = num_layers - len(untrainable)
        if untrainable:
            counted = f"trainable layers ({trainable}; layers {list(untrainable)} have no parameter that requires grad)"
        else:
            counted = f"layers ({num_layers})"
        if self.mode == "fixed":
            fixed = list(self.fixed_layers or ())
            bad = [i for i in fixed if i >= num_layers]
            if bad:
                raise SettingValueError(
                    f"fixed_layers={fixed} has indices {bad} out of range: "
                    f"the model has {num_layers} layers (0 to {num_layers - 1})"
                )
            frozen = [i for i in fixed if i in untrainable]
            if frozen:
                raise SettingValueError(
                    f"fixed_layers={fixed} names layers {frozen}, which have no parameter that requires grad (they "
                    "were frozen before fit), so they would train nothing. Unfreeze them or leave them out"
                )
        else:
            check_n_active(self.n_active, trainable, counted)
        if trainable_modules is not None:
            trainable, counted = trainable_modules, f"trainable modules ({trainable_modules})"
        if self.target_effective_layers is not None and self.target_effective_layers > trainable:
            raise SettingValueError(
                f"target_effective_layers={self.target_effective_layers} must be between 1 and the number of {counted}"
            )
        if self.max_probability is not None and self.max_probability < 1 / trainable:
            what = "trainable layers" if untrainable else "layers"
            if trainable_modules is not None:
                what = "trainable modules"
            raise SettingValueError(
                f"max_probability={self.max_probability} is below 1/{trainable}, the uniform probability of the "
                f"model's {trainable} {what}; no distribution can respect it"
            )

    def _check_fixed_layers(self) -> None:
        layers = self.fixed_layers
        if layers is None or isinstance(layers, (str, bytes)) or not len(layers):
            raise SettingValueError(f"fixed_layers={layers!r}: mode='fixed' needs a non-empty list of layer indices")
        for index in layers:
            check_int("fixed_layers", index, minimum=0)
        duplicates = sorted({i for i in layers if list(layers).count(i) > 1})
        if duplicates:
            raise SettingValueError(f"fixed_layers={list(layers)} repeats {duplicates}; each layer may appear once")
        object.__setattr__(self, "fixed_layers", tuple(sorted(layers)))
        object.__setattr__(self, "n_active", len(layers))
