"""Stepping a tensor in chunks of rows: which optimizers allow it, how many rows fit, and a state cut and rejoined.

A tensor whose state (with its fp32 master) is larger than a byte budget can still be streamed: its state is
kept in the tier as chunks along its first dimension, and each chunk is fetched, updated and written back in
turn, the next one fetched during the update. For an optimizer whose update of an element reads only that
element's gradient and state (Adam, AdamW, SGD with or without momentum, weight decay and masters), updating
rows ``[a, b)`` on their own is the same arithmetic as updating the whole tensor, so the result is bit-identical.
Others (Adafactor's factored moments, blockwise-quantized 8-bit states) would change their update; they are not
chunked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_grass.offload.state_bytes import device_bytes_while_stepped

#: Optimizers whose update is elementwise: a chunk of rows steps as it would within the whole tensor.
ELEMENTWISE_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def is_elementwise(optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s ``step()`` is one of :data:`ELEMENTWISE_OPTIMIZERS`' own (not overridden)."""
    return any(type(optimizer).step is known.step for known in ELEMENTWISE_OPTIMIZERS)


def chunk_numel(param: Tensor, rows: tuple[int, int] | None) -> int | None:
    """Elements of rows ``[start, stop)`` of ``param``; ``None`` for the whole tensor (``rows=None``).

    A 0-d tensor counts as one row of one element.
    """
    if rows is None:
        return None
    row_numel = param.numel() // param.shape[0] if param.dim() and param.shape[0] else 1
    return (rows[1] - rows[0]) * row_numel


def rows_per_chunk(optimizer: Optimizer, param: nn.Parameter, master: bool, budget: int) -> int:
    """Rows of ``param`` per chunk, so that a chunk while stepped takes at most half the budget, or else all of it.

    Half lets the next chunk be fetched while one is updated. Returns 0 when one row does not fit in the budget.

    Args:
        optimizer: The optimizer that holds ``param``.
        param: A parameter with at least one dimension.
        master: Whether ``param`` is stepped on an fp32 master.
        budget: The byte budget.
    """
    fixed = device_bytes_while_stepped(optimizer, param, master, numel=0)
    per_row = device_bytes_while_stepped(optimizer, param, master, numel=chunk_numel(param, (0, 1))) - fixed
    rows = (budget // 2 - fixed) // per_row
    if rows < 1:
        rows = (budget - fixed) // per_row
    return max(0, min(int(rows), param.shape[0] if param.dim() else 1))


def row_ranges(num_rows: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``rows`` rows (the last one shorter) covering ``num_rows`` rows."""
    return [(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)]


def state_rows(state: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``[start, stop)`` of a parameter's state: tensors with a first dimension are cut, the rest kept."""
    return {key: value[start:stop] if _has_rows(value) else value for key, value in state.items()}


def joined_rows(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The state of a whole parameter from its chunks' states, in row order.

    Tensors with a first dimension are concatenated along it; a scalar (the ``step`` counter, which every chunk
    advanced once per step) and non-tensor values are the first chunk's.
    """
    first = states[0]
    return {key: torch.cat([s[key] for s in states]) if _has_rows(value) else value for key, value in first.items()}


def _has_rows(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0
