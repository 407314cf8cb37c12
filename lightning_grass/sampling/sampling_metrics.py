"""What :class:`~lightning_grass.GRASSCallback` logs to the Trainer's loggers: the metrics of each history record."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.loggers import Logger


def metrics_of_record(record: dict[str, Any]) -> dict[str, float]:
    """The metrics of one :attr:`~lightning_grass.GRASSCallback.history` record, named as the loggers show them.

    ``grass/effective_layers``, then for each layer ``NN`` (two digits, one per entry of the record's
    ``draw_share``) ``grass/active/layer_NN`` (1.0 for an active layer, else 0.0), ``grass/draw_share/layer_NN``,
    ``grass/probability/layer_NN`` and ``grass/importance/layer_NN``. A value the record holds as ``None`` is
    left out: importance in ``lisa`` and ``fixed`` modes, probabilities and the effective layers in ``fixed``.

    Args:
        record: A complete history record (with its ``draw_share``).

    Returns:
        The metrics, each a float.
    """
    metrics = {}
    if record["effective_layers"] is not None:
        metrics["grass/effective_layers"] = record["effective_layers"]
    for layer in range(len(record["draw_share"])):
        metrics[f"grass/active/layer_{layer:02d}"] = float(layer in record["active_layers"])
        metrics[f"grass/draw_share/layer_{layer:02d}"] = record["draw_share"][layer]
        if record["probabilities"] is not None:
            metrics[f"grass/probability/layer_{layer:02d}"] = record["probabilities"][layer]
        if record["importance"] is not None:
            metrics[f"grass/importance/layer_{layer:02d}"] = record["importance"][layer]
    return metrics


def log_record_metrics(loggers: Iterable[Logger], record: dict[str, Any]) -> None:
    """Log :func:`metrics_of_record` of ``record`` to every logger, at the record's optimizer step.

    Args:
        loggers: The Trainer's loggers (``trainer.loggers``); none logs nothing.
        record: A complete history record.
    """
    metrics = metrics_of_record(record)
    for logger in loggers:
        logger.log_metrics(metrics, step=record["step"])
