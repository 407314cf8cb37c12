"""What :class:`~lightning_grass.GRASSCallback` logs to the Trainer's loggers: the metrics of each history record."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.loggers import Logger


def metrics_of_record(record: dict[str, Any], unit: str = "layer") -> dict[str, float]:
    """The metrics of one :attr:`~lightning_grass.GRASSCallback.history` record, named as the loggers show them.

    ``grass/effective_layers``, then for each layer ``NN`` (two digits, one per entry of the record's
    ``draw_share``) ``grass/active/layer_NN`` (1.0 for an active layer, else 0.0), ``grass/draw_share/layer_NN``,
    ``grass/probability/layer_NN`` and ``grass/importance/layer_NN``. With ``unit="module"`` the same four per
    module, ``module_NNN`` (three digits, the index into ``GRASSCallback.units``). A value the record holds as
    ``None`` is left out: importance in ``lisa`` and ``fixed`` modes, probabilities and the effective layers in
    ``fixed``.

    Args:
        record: A complete history record (with its ``draw_share``).
        unit: ``"layer"`` or ``"module"``, what the record's units are.

    Returns:
        The metrics, each a float.
    """
    metrics = {}
    if record["effective_layers"] is not None:
        metrics["grass/effective_layers"] = record["effective_layers"]
    active = set(record.get("active_units", record["active_layers"]))
    for index in range(len(record["draw_share"])):
        name = f"layer_{index:02d}" if unit == "layer" else f"module_{index:03d}"
        metrics[f"grass/active/{name}"] = float(index in active)
        metrics[f"grass/draw_share/{name}"] = record["draw_share"][index]
        if record["probabilities"] is not None:
            metrics[f"grass/probability/{name}"] = record["probabilities"][index]
        if record["importance"] is not None:
            metrics[f"grass/importance/{name}"] = record["importance"][index]
    return metrics


def log_record_metrics(loggers: Iterable[Logger], record: dict[str, Any], unit: str = "layer") -> None:
    """Log :func:`metrics_of_record` of ``record`` to every logger, at the record's optimizer step.

    Args:
        loggers: The Trainer's loggers (``trainer.loggers``); none logs nothing.
        record: A complete history record.
        unit: ``"layer"`` or ``"module"``, what the record's units are.
    """
    metrics = metrics_of_record(record, unit)
    for logger in loggers:
        logger.log_metrics(metrics, step=record["step"])
