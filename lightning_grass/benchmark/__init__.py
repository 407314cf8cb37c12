"""The method comparison of ``experiments/``: read a ``grass-train -m`` sweep, write tables and figures."""

from lightning_grass.benchmark.report import format_table, write_results
from lightning_grass.benchmark.runs import METHOD_LABELS, Run, load_runs
from lightning_grass.benchmark.summary import MethodSummary, method_hyperparameters, shared_hyperparameters, summarize

__all__ = [
    "METHOD_LABELS",
    "MethodSummary",
    "Run",
    "format_table",
    "load_runs",
    "method_hyperparameters",
    "shared_hyperparameters",
    "summarize",
    "write_results",
]
