"""``grass-train``: the Hydra entry point that fine-tunes a causal LM with GRASS and reports what it did.

``grass-train`` (or ``python -m lightning_grass.app.train``) runs from any directory: its configs ship in the
package (``lightning_grass.conf``, the repository's ``conf/``), and ``--config-dir DIR`` adds your own.
Any config value can be overridden on the command line (``trainer.max_steps=50 sampler=lisa``), and
``grass-train -m sampler=lisa,grass seed=0,1`` runs one job per combination. Bad input stops the run with
one line, ``error: <message>``, and exit status 2 (see :mod:`lightning_grass.app.input_errors`).

Exit statuses: 0, the run trained and wrote its outputs; 2, bad input (nothing was trained or damaged);
3, training diverged (weights not finite, the last loss not finite, or more than half the steps skipped for
non-finite gradients), written anyway; 130 and 143, stopped by SIGINT or SIGTERM (during training, as it
ended, or during the final evaluation), with the resume command printed.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from hydra_plugins.lightning_grass_launcher.process_launcher import ProcessLauncher
from lightning_grass.app import plots
from lightning_grass.app.checkpoints import (
    CHECKPOINT_DIR,
    SAVED_CONFIG,
    check_checkpoint_settings,
    check_resume_checkpoint,
    checkpoint_callbacks,
    report_changed_settings,
    resume_path,
    resumes_in_place,
)
from lightning_grass.app.data import build_char_tokenizer, vocabulary_config
from lightning_grass.app.evaluation import exact_match
from lightning_grass.app.gguf_base import ensure_gguf_base
from lightning_grass.app.hydra_output import write_hydra_record
from lightning_grass.app.input_errors import report_input_errors, trainer_settings
from lightning_grass.app.machine import describe_machine
from lightning_grass.app.pretrain import build_base_model, ensure_base_model
from lightning_grass.app.run_directory import claim_output_dir
from lightning_grass.app.run_stats import RunStats
from lightning_grass.app.stop_signals import StopRequested, stop_signals_raise
from lightning_grass.app.suite_evaluation import SuiteEvaluation
from lightning_grass.app.trainer_checks import check_trainer_settings
from lightning_grass.errors import SettingValueError
from lightning_grass.persistence.atomic_checkpoint_io import AtomicCheckpointIO
from lightning_grass.persistence.atomic_files import replace_directory_atomically, write_text_atomically
from lightning_grass.persistence.preemption import CheckpointOnSigterm
from lightning_grass.sampling.callback import GRASSCallback
from lightning_grass.setting_checks import check_seed

# The `process` launcher ships in this package. Hydra finds plugins by scanning the directories of the
# hydra_plugins namespace, which misses it in an editable install run from outside the checkout; registering
# it here makes `hydra/launcher=process` work however the package was installed.
Plugins.instance().register(ProcessLauncher)

#: The package that holds the configs: the repository's ``conf/``, installed as ``lightning_grass.conf``.
CONFIG_PACKAGE = "lightning_grass.conf"

#: The exit status of a run that trained but diverged: its weights are not finite, or it skipped more than half
#: of its steps for non-finite gradients. Its outputs are written first.
DIVERGED_STATUS = 3


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Build the base if needed, fine-tune, evaluate before and after, and write the run's outputs.

    The run holds ``output_dir`` while it works (:func:`~lightning_grass.app.run_directory.claim_output_dir`),
    and every file it must not lose (checkpoints, ``metrics.json``, ``model/``, ``resolved_config.yaml``) is
    written atomically.

    Args:
        cfg: The composed config (see ``conf/train.yaml``).
        output_dir: The run's directory.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        SystemExit: With :data:`DIVERGED_STATUS` after writing the outputs of a run that diverged, or
            ``128 + signal`` when SIGTERM or SIGINT stopped it.
    """
    run_start = time.perf_counter()
    _check_required_settings(cfg)
    ckpt_every_n_steps = cfg.get("ckpt_every_n_steps", 0)
    if cfg.stage != "pretrain":
        check_checkpoint_settings(ckpt_every_n_steps, cfg.get("ckpt_path"))
        check_seed("seed", cfg.seed)
    with claim_output_dir(output_dir, CHECKPOINT_DIR, resuming=resumes_in_place(cfg.get("ckpt_path"), output_dir)):
        write_hydra_record(cfg, output_dir)
        if cfg.stage == "pretrain":
            path = build_base_model(cfg.base.path, **OmegaConf.to_container(cfg.base.build, resolve=True))
            metrics = {"stage": "pretrain", "base_model_dir": str(path), "seconds": time.perf_counter() - run_start}
            _write_json(output_dir / "metrics.json", metrics)
            print(f"Base model written to {path}")
            return metrics
        return _finetune(cfg, output_dir, run_start)


def _check_required_settings(cfg: DictConfig) -> None:
    """Refuse a config that leaves a setting to the user (``???``, e.g. ``model=local``'s ``pretrained_path``)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{name}=..." for name in missing)
        raise SettingValueError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: the configs chosen leave "
            f"{'it' if len(missing) == 1 else 'them'} to you ('???'); give {'it' if len(missing) == 1 else 'them'} "
            f"on the command line ({example})"
        )


def _finetune(cfg: DictConfig, output_dir: Path, run_start: float) -> dict[str, Any]:
    ckpt_every_n_steps = cfg.get("ckpt_every_n_steps", 0)
    suite = SuiteEvaluation.from_config(cfg.get("evaluate_suite"))  # its test sets are read and checked now
    base_seconds = _prepare_base(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    module = _build_module(cfg)
    strategy = instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    ckpt_path = resume_path(cfg.get("ckpt_path"), output_dir)
    if ckpt_path is not None and ckpt_path.is_file():
        resumed_step = check_resume_checkpoint(ckpt_path, module, strategy)
        report_changed_settings(cfg, output_dir, resumed_step)
    datamodule = instantiate(cfg.data, _convert_="all")  # plain containers: checkpoints load with weights_only
    datamodule.tokenizer = module.tokenizer
    datamodule.setup("fit")
    if ckpt_path is None:
        _write_config(cfg, output_dir)

    sampler: GRASSCallback | None = instantiate(cfg.sampler) if cfg.get("sampler") else None
    stats = RunStats()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += [stats] + ([sampler] if sampler is not None else [])
    callbacks += checkpoint_callbacks(output_dir, ckpt_every_n_steps)
    loggers = [instantiate(c, save_dir=str(output_dir)) for c in (cfg.get("logger") or {}).values() if c is not None]
    with trainer_settings("trainer"):  # Lightning's own refusals become one line naming the trainer
        trainer: pl.Trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            strategy=strategy,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=str(output_dir),
            enable_checkpointing=ckpt_every_n_steps > 0,
        )
    check_trainer_settings(trainer)

    eval_examples = datamodule.val_examples[: cfg.model.get("eval_examples", 64)]
    pattern = cfg.model.get("answer_pattern") or cfg.data.get("answer_pattern")
    exact_match_before = None
    if cfg.get("evaluate_before", True):
        exact_match_before = _exact_match(module, eval_examples, pattern)
    start = time.perf_counter()
    _fit(trainer, module, datamodule, cfg, output_dir, ckpt_path)
    fit_seconds = time.perf_counter() - start
    try:
        with stop_signals_raise():
            _stop_if_signalled_as_fit_ended(trainer, cfg, output_dir)
            metrics = _evaluate_and_write(
                cfg, output_dir, trainer, module, datamodule, sampler, stats, eval_examples, pattern, suite
            )
    except StopRequested as stop:
        if trainer.is_global_zero:
            print(f"stopped by {stop.signal_name} during the final evaluation; {_resume_hint(cfg, output_dir)}")
        raise SystemExit(stop.exit_status) from None
    metrics.update(exact_match_before=exact_match_before, fit_seconds=fit_seconds, base_build_seconds=base_seconds)
    if not trainer.is_global_zero:  # under DDP every rank holds the same result; rank 0 writes it
        return metrics
    metrics["run_seconds"] = time.perf_counter() - run_start
    _write_json(output_dir / "metrics.json", metrics)
    _print_summary(metrics, output_dir)
    diverged = _divergence(metrics)
    if diverged is not None:
        print(f"error: training diverged: {diverged}; outputs written to {output_dir}", file=sys.stderr)
        raise SystemExit(DIVERGED_STATUS)
    return metrics


def _evaluate_and_write(
    cfg: DictConfig,
    output_dir: Path,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    sampler: GRASSCallback | None,
    stats: RunStats,
    eval_examples: list[Any],
    pattern: str | None,
    suite: SuiteEvaluation | None,
) -> dict[str, Any]:
    """Score the fine-tuned model, save it and its plots, and return the metrics (``metrics.json`` comes later).

    With ``suite``, the saved model is scored on it too, into ``<output_dir>/suite/``.
    """
    module.to(trainer.strategy.root_device)
    exact_match_after = _exact_match(module, eval_examples, pattern)
    test_examples = datamodule.test_examples[: cfg.model.get("eval_examples", 64)]
    exact_match_test = _exact_match(module, test_examples, pattern) if test_examples else None

    model_dir = output_dir / "model"
    skipped_steps = list(sampler.skipped_steps) if sampler is not None else []
    metrics: dict[str, Any] = {
        "stage": "finetune",
        "method": _method_name(cfg, sampler),
        "task": cfg.data.task,
        "seed": cfg.seed,
        "exact_match_before": None,
        "exact_match_after": exact_match_after,
        "exact_match_test": exact_match_test,
        **stats.metrics(),
        **stats.summary(trainer.strategy.root_device),
        "validation_curve": stats.validation_curve,
        "optimizer_steps": trainer.global_step,
        "skipped_non_finite_steps": skipped_steps,
        "non_finite_tensors": _non_finite_tensors(module),
        "trainable_parameters_per_step": _trainable_per_step(module, sampler),
        "model_dir": str(model_dir),
        "machine": describe_machine(trainer.strategy.root_device),
    }
    if sampler is not None:
        metrics["unit"] = sampler.config.unit
        metrics["layer_selection_counts"] = plots.selection_counts(
            sampler.history, sampler.layer_map.num_layers, key="active_layers"
        )
        if sampler.config.unit == "module":
            metrics["parameter_budget"] = sampler.parameter_budget
            metrics["modules"] = list(sampler.units.names)
            metrics["module_selection_counts"] = plots.selection_counts(sampler.history, len(sampler.units))
        spreads = [r["effective_layers"] for r in sampler.history if r.get("effective_layers") is not None]
        metrics["effective_layers_mean"] = sum(spreads) / len(spreads) if spreads else None
        metrics["draw_share"] = sampler.draw_share
        metrics["history"] = sampler.history
    weights = _gathered_weights(module)  # every rank takes part under FSDP2
    if not trainer.is_global_zero:
        return metrics
    replace_directory_atomically(model_dir, lambda staging: _save_pretrained(module, staging, weights))
    if suite is not None:
        metrics.update(suite.run(module.model, module.tokenizer, output_dir / "suite", str(model_dir)).metrics())
    _write_config(cfg, output_dir)
    if sampler is not None and cfg.get("save_plots", True):
        if any(record["importance"] is not None for record in sampler.history):
            heatmap = plots.importance_heatmap(sampler.history, output_dir / "importance.png")
            metrics["importance_heatmap"] = str(heatmap)
        names = sampler.units.names if sampler.config.unit == "module" else None
        selection = plots.selection_frequency(sampler.history, output_dir / "selection.png", len(sampler.units), names)
        metrics["selection_plot"] = str(selection)
        diagnostics = plots.sampling_diagnostics(
            sampler.history, output_dir / "sampling.png", len(sampler.units), names
        )
        metrics["sampling_plot"] = str(diagnostics)
    return metrics


def _fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    cfg: DictConfig,
    output_dir: Path,
    ckpt_path: Path | None,
) -> None:
    """``trainer.fit`` from ``ckpt_path``; on SIGTERM or SIGINT, say how to resume and exit 143 or 130."""
    if cfg.get("ckpt_path") == "last" and ckpt_path is None and trainer.is_global_zero:
        print(f"no checkpoint in {output_dir / CHECKPOINT_DIR} yet: starting from step 0")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stop = next((c.stop_signal for c in trainer.callbacks if isinstance(c, CheckpointOnSigterm)), None)
        stop = stop or "SIGTERM"
        if trainer.is_global_zero:
            print(f"stopped by {stop} after step {trainer.global_step}; {_resume_hint(cfg, output_dir)}", flush=True)
        raise SystemExit(128 + signal.Signals[stop].value) from None


def _stop_if_signalled_as_fit_ended(trainer: pl.Trainer, cfg: DictConfig, output_dir: Path) -> None:
    """Exit ``128 + signal`` when SIGTERM or SIGINT arrived during the last step, or after it, while ``fit`` ended.

    Lightning stops at the next step boundary; after the last step there is none, and ``fit`` returns as if
    nothing had arrived. The job was still told to stop, and the final evaluation can take long.
    """
    if not trainer.received_sigterm:
        return
    stop = next((c.stop_signal for c in trainer.callbacks if isinstance(c, CheckpointOnSigterm)), None) or "SIGTERM"
    if trainer.is_global_zero:
        print(
            f"stopped by {stop} as training ended (step {trainer.global_step}), before the final evaluation; "
            f"{_resume_hint(cfg, output_dir)}",
            flush=True,
        )
    raise SystemExit(128 + signal.Signals[stop].value)


def _resume_hint(cfg: DictConfig, output_dir: Path) -> str:
    if cfg.get("ckpt_every_n_steps", 0) == 0:
        return "no checkpoint was written (ckpt_every_n_steps=0)"
    return f"resume with ckpt_path=last paths.output_dir={output_dir}"


def _write_config(cfg: DictConfig, output_dir: Path) -> None:
    write_text_atomically(output_dir / SAVED_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def _exact_match(module: pl.LightningModule, examples: list[Any], pattern: str | None) -> float:
    """Exact match of ``module`` on ``examples``, generating up to the model's own ``max_new_tokens``."""
    return exact_match(module.model, module.tokenizer, examples, pattern, module.hparams.max_new_tokens)


def _gathered_weights(module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
    """The model's full weights on the CPU of rank 0 when FSDP2 (``grass_fsdp``) shards them, else ``None``.

    A collective: under FSDP2 every rank must call it.
    """
    if not any(isinstance(p, DTensor) for p in module.model.parameters()):
        return None
    return get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_pretrained(
    module: pl.LightningModule, directory: Path, weights: dict[str, torch.Tensor] | None = None
) -> None:
    """``module.save_pretrained(directory)``, with safetensors' write errors raised as the ``OSError`` they are.

    safetensors reports a full disk as ``SafetensorError`` ("... No space left on device (os error 28)"); as an
    ``OSError`` it becomes the one-line :class:`~lightning_grass.errors.StorageError` that names the directory.
    """
    try:
        module.save_pretrained(directory, weights)
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(directory)) from error


def _non_finite_tensors(module: pl.LightningModule) -> int:
    """How many of the module's weight tensors hold NaN or Inf."""
    with torch.no_grad():
        return sum(int(not torch.isfinite(p).all()) for p in module.parameters())


def _divergence(metrics: dict[str, Any]) -> str | None:
    """Why the run counts as diverged, or ``None``."""
    if metrics["non_finite_tensors"]:
        return f"{metrics['non_finite_tensors']} weight tensors hold NaN or Inf"
    last_loss = metrics.get("train/loss")
    if last_loss is not None and not math.isfinite(last_loss):
        return f"the last training loss is {last_loss}"
    skipped, steps = len(metrics["skipped_non_finite_steps"]), metrics["optimizer_steps"]
    if steps and skipped > steps / 2:
        return f"{skipped} of {steps} optimizer steps were skipped for non-finite gradients"
    return None


def _prepare_base(cfg: DictConfig) -> float | None:
    """Build or convert the base model the run starts from, if it is not in the cache yet.

    Returns:
        The seconds it took, or ``None`` when the cached base was reused or the model is not the base.
    """
    pretrained_path = cfg.model.get("pretrained_path")
    if pretrained_path is None or Path(pretrained_path) != Path(cfg.base.path):
        return None
    if cfg.base.get("gguf") is not None:
        return ensure_gguf_base(cfg.base.path, **OmegaConf.to_container(cfg.base.gguf, resolve=True))[1]
    if cfg.base.build_if_missing:
        return ensure_base_model(cfg.base.path, **OmegaConf.to_container(cfg.base.build, resolve=True))[1]
    return None


def _build_module(cfg: DictConfig) -> pl.LightningModule:
    """The model from a local directory, or from a config with the built-in tokenizer's vocabulary."""
    if cfg.model.get("pretrained_path") is not None:
        return instantiate(cfg.model, _convert_="all")
    tokenizer = build_char_tokenizer()
    config = {**OmegaConf.to_container(cfg.model.config, resolve=True), **vocabulary_config(tokenizer)}
    node = OmegaConf.to_container(cfg.model, resolve=True)
    module = instantiate({**node, "config": config}, _convert_="all")
    module.tokenizer = tokenizer
    return module


def _method_name(cfg: DictConfig, sampler: GRASSCallback | None) -> str:
    """The sampler's mode (``_module`` added when it draws modules); ``lora`` for LoRA; ``full`` otherwise."""
    if sampler is not None:
        return sampler.config.mode + ("_module" if sampler.config.unit == "module" else "")
    return "lora" if cfg.model.get("lora") else "full"


def _trainable_per_step(module: pl.LightningModule, sampler: GRASSCallback | None) -> int:
    """The most parameters trained at one optimizer step: the sampler's count, or every trainable parameter."""
    if sampler is not None:
        return sampler.trainable_parameters_per_step()
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def _percent(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.1%}"


def _print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    mib = 2**20
    lines = [
        "",
        f"GRASS fine-tuning summary ({metrics['method']} on {metrics['task']}, seed {metrics['seed']})",
        f"  exact match       {_percent(metrics['exact_match_before'])} before -> "
        f"{metrics['exact_match_after']:.1%} after"
        + (f" (test {metrics['exact_match_test']:.1%})" if metrics.get("exact_match_test") is not None else ""),
        f"  peak memory       {metrics['peak_memory_bytes'] / mib:.0f} MiB",
        f"  optimizer state   {metrics['optimizer_state_bytes_peak'] / mib:.1f} MiB at peak on the device",
        f"  median step       {metrics['median_step_seconds'] * 1e3:.0f} ms; fit took {metrics['fit_seconds']:.0f} s",
    ]
    if metrics["optimizer_steps"] == 0:
        lines.append("  optimizer steps   0: nothing was trained; model/ holds the base model")
    if metrics["skipped_non_finite_steps"]:
        skipped = metrics["skipped_non_finite_steps"]
        lines.append(
            f"  skipped steps     {len(skipped)} of {metrics['optimizer_steps']} for non-finite gradients "
            f"(first: step {skipped[0]})"
        )
    if metrics["non_finite_tensors"]:
        lines.append(f"  non-finite        {metrics['non_finite_tensors']} weight tensors hold NaN or Inf")
    if metrics.get("base_build_seconds") is not None:
        seconds = metrics["base_build_seconds"]
        lines.append(f"  base model        built or converted in {seconds:.0f} s (first run only)")
    if "layer_selection_counts" in metrics:
        lines.append(f"  layer activity    windows active per layer: {metrics['layer_selection_counts']}")
    if "module_selection_counts" in metrics:
        spread = metrics["effective_layers_mean"]
        lines.append(
            f"  modules           {len(metrics['modules'])}, drawn up to {metrics['parameter_budget']:,} parameters "
            + ("per window" if spread is None else f"per window; {spread:.1f} effective modules on average")
            + " (windows per module in metrics.json)"
        )
    elif metrics.get("effective_layers_mean") is not None and metrics["draw_share"] is not None:
        shares = ", ".join(f"{share:.0%}" for share in metrics["draw_share"])
        lines.append(
            f"  sampling          {metrics['effective_layers_mean']:.1f} effective layers on average; "
            f"share of draws per layer: {shares}"
        )
    lines += [
        f"  metrics           {output_dir / 'metrics.json'}",
        f"  model             {metrics['model_dir']}",
    ]
    if "importance_heatmap" in metrics:
        lines.append(f"  importance plot   {metrics['importance_heatmap']}")
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers such as Optuna."""
    with report_input_errors():
        metrics = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    metric = cfg.get("optimized_metric")
    return float(metrics[metric]) if metric else None


if __name__ == "__main__":
    main()
