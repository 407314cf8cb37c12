"""Tensors stepped in chunks of rows under a budget below their size: the arithmetic, and bitwise the whole step."""

import pytest
import torch

from lightning_grass.offload import DiskTier, HostTier, OffloadedOptimizer, TensorStateStore, expected_state_bytes
from lightning_grass.offload.row_chunks import (
    is_elementwise,
    joined_rows,
    row_ranges,
    rows_per_chunk,
    state_rows,
)
from lightning_grass.offload.state_bytes import device_bytes_while_stepped

SHAPES = [(40, 8), (12, 8), (7,)]


def test_chunks_cover_every_row_and_a_state_cut_then_joined_is_the_state():
    assert row_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert row_ranges(3, 5) == [(0, 3)]
    state = {"step": torch.tensor(3.0), "exp_avg": torch.randn(10, 2), "flag": True}
    parts = [state_rows(state, start, stop) for start, stop in row_ranges(10, 4)]
    assert [p["exp_avg"].shape[0] for p in parts] == [4, 4, 2] and all(p["step"] is state["step"] for p in parts)
    joined = joined_rows(parts)
    assert torch.equal(joined["exp_avg"], state["exp_avg"]) and joined["step"] is state["step"] and joined["flag"]


def test_rows_per_chunk_fit_half_the_budget_or_else_all_of_it():
    param = torch.nn.Parameter(torch.zeros(64, 32))
    adamw = torch.optim.AdamW([param], foreach=False)
    # One row while stepped: 32 fp32 elements x (two moments + the for-loop's two temporaries) = 512 bytes, and
    # the chunk's 4-byte step counter.
    assert device_bytes_while_stepped(adamw, param, False, numel=32) == 516
    assert rows_per_chunk(adamw, param, False, budget=4096) == (2048 - 4) // 512 == 3
    assert rows_per_chunk(adamw, param, False, budget=600) == 1, "one row fits the budget, not half of it"
    assert rows_per_chunk(adamw, param, False, budget=515) == 0
    assert rows_per_chunk(adamw, param, False, budget=10**9) == 64


def test_only_elementwise_updates_are_chunked():
    param = torch.nn.Parameter(torch.zeros(4, 4))
    assert is_elementwise(torch.optim.AdamW([param])) and is_elementwise(torch.optim.SGD([param], lr=0.1))
    assert is_elementwise(torch.optim.Adam([param]))
    assert not is_elementwise(torch.optim.Adafactor([param]))

    class ClippedAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            return super().step(closure)

    assert not is_elementwise(ClippedAdamW([param])), "a step of its own may not be elementwise"


OPTIMIZERS = {
    "adamw_for_loop": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
}


def chunked_store(optimizer, params, tier, folder, mastered):
    """A store whose tensors all stream in chunks: the budget is a third of the largest while stepped."""
    budget = max(device_bytes_while_stepped(optimizer, p, mastered) for p in params) // 3
    units, rows, sizes = [], [], []
    for p in params:
        row_numel = p.numel() // p.shape[0]
        for start, stop in row_ranges(p.shape[0], rows_per_chunk(optimizer, p, mastered, budget)):
            units.append(p)
            rows.append((start, stop))
            sizes.append(expected_state_bytes(optimizer, p, mastered, numel=(stop - start) * row_numel))
    backing = DiskTier(folder) if tier == "disk" else HostTier(torch.device("cpu"), sizes)
    masters = params if mastered else []
    return TensorStateStore(optimizer, units, backing, budget, masters, rows=rows), budget


@pytest.mark.parametrize(
    ("name", "dtype", "tier"),
    [
        ("adamw_for_loop", torch.float32, "host"),
        ("adamw_foreach", torch.float32, "disk"),
        ("adamw_fused", torch.float32, "host"),
        ("sgd_momentum", torch.float32, "disk"),
        ("adamw_for_loop", torch.bfloat16, "host"),
        ("adamw_foreach", torch.bfloat16, "disk"),
    ],
)
def test_chunked_steps_are_bitwise_the_whole_tensor_steps_and_stay_within_the_budget(tmp_path, name, dtype, tier):
    torch.manual_seed(0)
    values = [torch.randn(shape).to(dtype) for shape in SHAPES]
    whole = [torch.nn.Parameter(v.clone()) for v in values]
    chunked = [torch.nn.Parameter(v.clone()) for v in values]
    mastered = dtype == torch.bfloat16
    # The reference: the same optimizer stepping every tensor whole (on fp32 masters for bf16).
    reference = OffloadedOptimizer(OPTIMIZERS[name](whole), None, whole if mastered else [])
    inner = OPTIMIZERS[name](chunked)
    store, budget = chunked_store(inner, chunked, tier, tmp_path, mastered)
    assert len(store.params) > 2 * len(SHAPES), "the tensors are cut into chunks"
    offloaded = OffloadedOptimizer(inner, store, chunked if mastered else [])

    def train(steps):
        for _ in range(steps):
            grads = [torch.randn(shape).to(dtype) for shape in SHAPES]
            for a, b, g in zip(whole, chunked, grads, strict=True):
                a.grad, b.grad = g.clone(), g.clone()
            reference.step()
            offloaded.prefetch()
            offloaded.step()
            for a, b in zip(whole, chunked, strict=True):
                assert torch.equal(a, b)

    train(4)
    assert store.stats["peak_resident_bytes"] <= budget, "the peak over every store call is within the budget"
    assert not inner.state, "every chunk's state went back to the tier after its update"

    # The checkpointed state is the whole tensors' state, as the reference holds it.
    saved = offloaded.state_dict()
    for index, p in enumerate(whole):
        expected = reference.optimizer.state[p]
        assert sorted(saved["state"][index]) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(saved["state"][index][key], value), (index, key)

    # Loaded into a fresh store, cut into the same chunks, it trains on as the reference does.
    fresh_inner = OPTIMIZERS[name](chunked)
    fresh_store, _ = chunked_store(fresh_inner, chunked, tier, tmp_path, mastered)
    offloaded.store.close()
    offloaded = OffloadedOptimizer(fresh_inner, fresh_store, chunked if mastered else [])
    offloaded.load_state_dict(saved)
    assert not fresh_inner.state
    train(2)
    fresh_store.close()


def test_expected_bytes_of_a_chunk_are_its_rows_share():
    param = torch.nn.Parameter(torch.zeros(10, 6, dtype=torch.bfloat16))
    adamw = torch.optim.AdamW([param])
    # fp32 moments and master for 4 rows of 6, and the chunk's own step counter.
    assert expected_state_bytes(adamw, param, True, numel=24) == 24 * 12 + 4
