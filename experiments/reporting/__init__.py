"""The method comparison of ``experiments/``: read a ``grass-train -m`` sweep, write tables and figures."""

from reporting.report import format_table, write_results
from reporting.runs import METHOD_LABELS, Run, load_runs
from reporting.summary import MethodSummary, method_hyperparameters, shared_hyperparameters, summarize

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
