"""Training a tiny Llama window by window, the active layers set by hand: how the offload tests drive the store."""

import torch
from conftest import VOCAB

from lightning_grass.offload import OffloadedOptimizer


def layer_params(model):
    return [p for layer in model.model.layers for p in layer.parameters()]


def units_of(model, layers):
    """The store's units (indices into layer_params) of ``layers``."""
    per_layer = len(list(model.model.layers[0].parameters()))
    return [layer * per_layer + i for layer in layers for i in range(per_layer)]


def train(model, optimizer, schedule, scheduler=None, seed=1):
    """One optimizer step per entry of ``schedule``, each training the layers it lists."""
    generator = torch.Generator().manual_seed(seed)
    for active in schedule:
        for index, layer in enumerate(model.model.layers):
            layer.requires_grad_(index in active)
        if isinstance(optimizer, OffloadedOptimizer):
            optimizer.set_active(units_of(model, active))
            optimizer.prefetch()
        tokens = torch.randint(0, VOCAB, (2, 12), generator=generator)
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
