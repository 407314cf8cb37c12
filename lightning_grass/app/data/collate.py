"""Padding a list of ``TokenizedExample`` into a batch of tensors."""

from __future__ import annotations

import torch

from lightning_grass.app.data.prompt import IGNORE_INDEX, TokenizedExample


def collate_batch(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every example to the longest one in the batch.

    Args:
        batch: The examples, at least one.
        pad_token_id: The id written into ``input_ids`` at padded positions.

    Returns:
        ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on tokens, 0 on padding) and
        ``labels`` (``-100`` on padding), each a long tensor of shape ``(len(batch), longest)``.

    Raises:
        ValueError: When ``batch`` is empty.
    """
    if not batch:
        raise ValueError("batch is empty; collate_batch needs at least one example")
    longest = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
