"""Checkpoints in ``grass-train``: where they go, which callbacks write them, and which one a run resumes.

A run with ``ckpt_every_n_steps=N`` keeps ``<output_dir>/checkpoints/last.ckpt``, rewritten every ``N``
optimizer steps, at the end of training, and when SIGTERM arrives. ``ckpt_path=last`` resumes from it,
``ckpt_path=/path/x.ckpt`` from any checkpoint. Every save is atomic
(:class:`~lightning_grass.AtomicCheckpointIO`), and a checkpoint is checked before the run resumes from it
(:func:`check_resume_checkpoint`); the settings that differ from the run's own are then reported
(:func:`report_changed_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.strategies import ParallelStrategy, Strategy, StrategyRegistry
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from typing_extensions import override

from lightning_grass.app.input_errors import one_line
from lightning_grass.errors import (
    CheckpointError,
    MissingPathError,
    SettingTypeError,
    SettingValueError,
    StorageError,
)
from lightning_grass.persistence.atomic_checkpoint_io import read_checkpoint
from lightning_grass.persistence.preemption import CheckpointOnSigterm

#: The folder of a run's checkpoints, inside its output directory.
CHECKPOINT_DIR = "checkpoints"

#: The file ``ckpt_path=last`` resumes from, inside :data:`CHECKPOINT_DIR`.
LAST = "last.ckpt"

#: The run's settings, written into its output directory; a resume compares its own settings with them.
SAVED_CONFIG = "resolved_config.yaml"

#: Settings whose change on a resume is not worth a line: where the run writes and which checkpoint it reads.
UNCOMPARED_SETTINGS = ("ckpt_path", "paths")

#: What a stateful sampler (torchdata's ``_BatchSamplerIterator.state_dict``) keeps of its position, inside a
#: ``StatefulDataLoader``'s ``_sampler_iter_state``: a ``DistributedSampler`` has neither, and cannot load them.
_STATEFUL_SAMPLER_KEYS = ("sampler_state", "sampler_iter_state")


def check_checkpoint_settings(every_n_steps: object, ckpt_path: object) -> None:
    """Refuse bad checkpoint settings before any work starts.

    Args:
        every_n_steps: ``ckpt_every_n_steps``: an int, ``>= 0``.
        ckpt_path: ``ckpt_path``: ``None``, ``"last"`` or the path of an existing checkpoint file.

    Raises:
        SettingTypeError: When ``every_n_steps`` is not an int or ``ckpt_path`` not a string.
        SettingValueError: When ``every_n_steps`` is negative.
        MissingPathError: When ``ckpt_path`` names a file that does not exist.
    """
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
        raise SettingTypeError(f"ckpt_every_n_steps={every_n_steps!r} must be an int (0 turns checkpoints off)")
    if every_n_steps < 0:
        raise SettingValueError(f"ckpt_every_n_steps={every_n_steps!r} must be >= 0 (0 turns checkpoints off)")
    if ckpt_path is None or ckpt_path == "last":
        return
    if not isinstance(ckpt_path, str):
        raise SettingTypeError(f"ckpt_path={ckpt_path!r} must be 'last' or the path of a .ckpt file")
    if not Path(ckpt_path).is_file():
        raise MissingPathError(f"ckpt_path={ckpt_path!r} is not a file; give 'last' or the path of a .ckpt file")


def checkpoint_callbacks(output_dir: str | Path, every_n_steps: int) -> list[Callback]:
    """The callbacks that keep ``<output_dir>/checkpoints/last.ckpt`` current.

    Args:
        output_dir: The run's directory.
        every_n_steps: Optimizer steps between checkpoints; ``0`` for none.

    Returns:
        A :class:`LastCheckpoint` that writes ``last.ckpt`` every ``every_n_steps`` steps and at the end of
        training, and a :class:`~lightning_grass.persistence.preemption.CheckpointOnSigterm` that writes
        it on SIGTERM or SIGINT; no callbacks when ``every_n_steps`` is 0.

    Raises:
        StorageError: When ``last.ckpt`` is a directory, which no checkpoint could replace.
    """
    if every_n_steps == 0:
        return []
    last = Path(output_dir) / CHECKPOINT_DIR / LAST
    if last.is_dir():
        raise StorageError(
            f"cannot write checkpoints to {last}: it is a directory, not a file; move it away and run again"
        )
    return [LastCheckpoint(last, every_n_steps), CheckpointOnSigterm(last)]


class LastCheckpoint(Checkpoint):
    """Write one checkpoint file every ``every_n_steps`` optimizer steps, and once more when training ends.

    The save at the end of training comes after the last step's validation, so it holds the final weights and
    metrics: a run stopped during its final evaluation resumes with nothing left to train and the same metrics.
    The periodic save is skipped on the step where training ends (``max_steps``, or the last batch of the last
    epoch) and left to the end save, so that step is written once. The end save is skipped when the file holds
    the final state already: a run that resumes with nothing left to train rewrites nothing.

    Args:
        path: The checkpoint file. Each save replaces it atomically through the strategy's checkpoint plugin.
        every_n_steps: Optimizer steps between saves, at least 1.

    Attributes:
        saved_step: The global step of the state the file holds, ``None`` before training starts.
    """

    def __init__(self, path: str | Path, every_n_steps: int) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.saved_step: int | None = None
        self._validated_since_save = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_step = trainer.global_step  # 0, or the step resumed from: a checkpoint holds it already
        self._validated_since_save = False

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self.saved_step or step % self.every_n_steps or _is_last_step(trainer):
            return
        self._save(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_since_save = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self.saved_step or self._validated_since_save:
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step
        self._validated_since_save = False


def _is_last_step(trainer: pl.Trainer) -> bool:
    """Whether training ends after this optimizer step: ``max_steps`` is reached, or the last epoch's last batch.

    Every rank decides alike (from the step, the epoch and the batch count), so every rank saves alike.
    """
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    if trainer.max_epochs in (None, -1) or trainer.current_epoch + 1 < trainer.max_epochs:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches


def resume_path(ckpt_path: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint a run resumes from.

    Args:
        ckpt_path: ``None`` to start afresh, ``"last"`` for ``<output_dir>/checkpoints/last.ckpt``, or the
            path of a checkpoint.
        output_dir: The run's directory.

    Returns:
        The checkpoint file, or ``None`` to start from step 0: also for ``"last"`` when the run has no
        checkpoint yet, so that one command both starts a run and continues it after a preemption.

    Raises:
        MissingPathError: For ``"last"`` when ``last.ckpt`` is a directory, not a checkpoint file.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    last = Path(output_dir) / CHECKPOINT_DIR / LAST
    if last.is_dir():
        raise MissingPathError(
            f"ckpt_path=last names {last}, which is a directory, not a checkpoint file; move it away (the run "
            "writes its checkpoints there) and run again"
        )
    return last if last.is_file() else None


def resumes_in_place(ckpt_path: str | None, output_dir: str | Path) -> bool:
    """Whether ``ckpt_path`` continues the run of ``output_dir`` (``"last"``, or a file in its checkpoints)."""
    if ckpt_path is None:
        return False
    if ckpt_path == "last":
        return True
    return Path(ckpt_path).resolve().parent == (Path(output_dir) / CHECKPOINT_DIR).resolve()


def check_resume_checkpoint(path: str | Path, module: nn.Module, strategy: Strategy | str | None = None) -> int:
    """Check that training can resume from ``path`` with ``module`` and ``strategy``, before ``fit`` uses it.

    The file is memory-mapped, so the check reads little of a large checkpoint.

    Args:
        path: The checkpoint file.
        module: The LightningModule the run will load it into.
        strategy: The run's strategy, or its registered name (``"grass_ddp"``); ``None`` or ``"auto"`` skips
            the check of the data loader's position.

    Returns:
        The checkpoint's global step (0 in a checkpoint that does not record it, where Lightning starts too).

    Raises:
        CheckpointError: Naming the file and the first problem, when it is empty, truncated or not a Lightning
            checkpoint, holds the weights only (no optimizer state), holds another model (a tensor of another
            shape, or tensors missing or extra), or holds the position of a single-process data loader that
            ``strategy``'s distributed sampler cannot load.
    """
    checkpoint = read_checkpoint(path, map_location="cpu", mmap=True)
    if "optimizer_states" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path} holds the model's weights only (it was saved with weights_only=True), without the "
            "optimizer and loop states that training resumes from; resume from a full checkpoint, such as the "
            f"{CHECKPOINT_DIR}/{LAST} of a run"
        )
    _check_same_model(path, checkpoint["state_dict"], module.state_dict())
    _check_loader_position(path, checkpoint, strategy)
    return int(checkpoint.get("global_step", 0))


def _check_same_model(path: str | Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    missing = [name for name in expected if name not in saved]
    extra = [name for name in saved if name not in expected]
    if missing or extra:
        difference = f"lacks {missing[:2]}" if missing else f"has tensors this model lacks, e.g. {extra[:2]}"
        raise CheckpointError(
            f"checkpoint {path} holds another model: it {difference} ({len(missing)} missing, {len(extra)} extra "
            "of this model's tensors); resume with the model it was written with"
        )
    for name, tensor in expected.items():
        other = saved[name]
        if isinstance(other, torch.Tensor) and other.shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {path} holds another model shape: {name} is {list(other.shape)} in the checkpoint and "
                f"{list(tensor.shape)} in this model; resume with the model it was written with"
            )


def _check_loader_position(path: str | Path, checkpoint: dict[str, Any], strategy: Strategy | str | None) -> None:
    """Refuse a single-process run's data position under a strategy that gives each process a DistributedSampler.

    Lightning would load it into the new sampler during ``fit`` and fail there with an ``AssertionError``.
    """
    strategy_class = _strategy_class(strategy)
    if strategy_class is None or not issubclass(strategy_class, ParallelStrategy):
        return
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    loaders = [state for state in fit_loop.get("combined_loader") or [] if isinstance(state, dict)]
    positions = [state.get("_sampler_iter_state") for state in loaders]
    if not any(isinstance(p, dict) and any(key in p for key in _STATEFUL_SAMPLER_KEYS) for p in positions):
        return
    name = f"strategy={strategy}" if isinstance(strategy, str) else strategy_class.__name__
    raise CheckpointError(
        f"checkpoint {path} was written by a single-process strategy (such as strategy=grass), and {name} cannot "
        "load its position in the training data (it splits the data between processes); resume with the "
        f"strategy the run started with, or start a new run with {name}"
    )


def _strategy_class(strategy: Strategy | str | None) -> type[Strategy] | None:
    if isinstance(strategy, Strategy):
        return type(strategy)
    if isinstance(strategy, str) and strategy in StrategyRegistry:
        return StrategyRegistry[strategy]["strategy"]
    return None


def report_changed_settings(cfg: DictConfig, output_dir: str | Path, resumed_step: int) -> None:
    """Print the step a run resumes from, then one line per setting that differs from the run's saved settings.

    The saved settings are ``<output_dir>/resolved_config.yaml``. Where the run writes and which checkpoint it
    reads (:data:`UNCOMPARED_SETTINGS`) are not compared, nor the sampler's settings other than its class: the
    sampler reports its own. A saved file that cannot be read or parsed is reported in one line, and the run
    resumes without the comparison.

    Args:
        cfg: The resuming run's composed config.
        output_dir: The run's directory.
        resumed_step: The global step of the checkpoint it resumes from.
    """
    print(f"resuming from the checkpoint of step {resumed_step}")
    saved_path = Path(output_dir) / SAVED_CONFIG
    if not saved_path.is_file():
        return
    try:
        saved_config = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as error:
        print(f"could not compare settings with {saved_path}: {_unreadable(error)}; resuming without the comparison")
        return
    if not isinstance(saved_config, dict):
        print(
            f"could not compare settings with {saved_path}: it holds a {type(saved_config).__name__}, not a mapping "
            "of settings; resuming without the comparison"
        )
        return
    saved = _flatten(saved_config)
    current = _flatten(OmegaConf.to_container(cfg, resolve=True))
    for name in sorted(saved.keys() | current.keys()):
        if name.split(".")[0] in UNCOMPARED_SETTINGS or (name.startswith("sampler.") and name != "sampler._target_"):
            continue
        if saved.get(name) != current.get(name):
            print(f"resuming with {name}={current.get(name)!r}; the run started with {name}={saved.get(name)!r}")


def _unreadable(error: Exception) -> str:
    """Why a saved config could not be read, in a few words."""
    if isinstance(error, UnicodeDecodeError):
        return f"it is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        return f"it is not valid YAML ({error.problem}, line {error.problem_mark.line + 1})"
    if isinstance(error, OSError):
        return f"it cannot be read ({error.strerror or error})"
    return f"it cannot be parsed ({one_line(str(error))})"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}
