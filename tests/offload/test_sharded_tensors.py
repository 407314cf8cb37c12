"""The offload engine on sharded (DTensor) parameters, on a one-process gloo mesh: local parts, placements, sizes."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_grass.offload import (
    HostTier,
    OffloadedOptimizer,
    TensorStateStore,
    device_bytes_while_stepped,
    expected_state_bytes,
)
from lightning_grass.offload.sharded_tensors import ShardPlacement, local_part


@pytest.fixture
def mesh(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_placement_wraps_a_host_tensor_without_copying_it(mesh):
    sharded = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
    placement = ShardPlacement.of(sharded)
    assert placement == ShardPlacement(mesh, (Shard(0),), torch.Size([6, 4]), (4, 1))
    assert ShardPlacement.of(torch.ones(2)) is None

    host = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4)
    wrapped = placement.around(host)
    assert isinstance(wrapped, DTensor)
    shard = wrapped.to_local()
    assert shard.device.type == "cpu" and shard.data_ptr() == host.data_ptr(), "the local shard is the host tensor"
    assert wrapped.dtype == torch.bfloat16 and wrapped.shape == sharded.shape
    assert wrapped.placements == (Shard(0),) and not wrapped.requires_grad
    assert local_part(wrapped).data_ptr() == host.data_ptr() and local_part(host) is host


def test_sizes_count_this_ranks_shard_not_the_global_tensor(mesh):
    # A DTensor that says its global tensor is 4 times its local shard, as on rank 0 of 4.
    local = torch.zeros(8, 16)
    param = torch.nn.Parameter(
        DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size([32, 16]), stride=(16, 1))
    )
    assert param.numel() == 512 and local_part(param).numel() == 128
    adamw = torch.optim.AdamW([param])
    # Two fp32 moments per local element and the step counter; the for-loop step's two temporaries.
    assert expected_state_bytes(adamw, param, master=False) == 128 * 8 + 4
    assert device_bytes_while_stepped(adamw, param, master=False) == 128 * 8 + 4 + 128 * 8
    # With a master: fp32 moments and master, and the step's fp32 master gradient.
    assert expected_state_bytes(adamw, param, master=True) == 128 * 12 + 4


def test_streamed_dtensor_states_match_plain_adamw_and_live_in_the_tier_as_local_parts(mesh):
    torch.manual_seed(0)
    values = [torch.randn(6, 4), torch.randn(5)]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    sharded = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for v in values]
    reference = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1)
    inner = torch.optim.AdamW(sharded, lr=1e-2, weight_decay=0.1)
    sizes = [expected_state_bytes(inner, p, master=False) for p in sharded]
    budget = max(device_bytes_while_stepped(inner, p, master=False) for p in sharded)
    store = TensorStateStore(inner, sharded, HostTier(torch.device("cpu"), sizes), max_resident_bytes=budget)
    # The host tier's regions: each unit's bytes rounded up to 512, and 512 more for each of AdamW's two tensors
    # after the first (each tensor starts on a 512-byte boundary).
    regions = sum(-(-size // 512) * 512 + 2 * 512 for size in sizes)
    offloaded = OffloadedOptimizer(inner, store)
    for step in range(3):
        grads = [torch.randn_like(v) for v in values]
        for p, q, g in zip(plain, sharded, grads, strict=True):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        reference.step()
        offloaded.prefetch()
        offloaded.step()
        for p, q in zip(plain, sharded, strict=True):
            # One rank holds the whole tensor; the for-loop AdamW runs the same kernels on it, sharded or not.
            assert torch.equal(q.to_local(), p.detach()), step
    assert store.stats["peak_resident_bytes"] <= budget
    assert store.stats["backing_bytes"] == regions and not inner.state, "each state streamed back to the tier"

    saved = offloaded.state_dict()["state"]
    for index, p in enumerate(plain):
        for key in ("exp_avg", "exp_avg_sq"):
            value = saved[index][key]
            assert isinstance(value, DTensor) and value.to_local().device.type == "cpu"
            assert torch.equal(value.to_local(), reference.state[p][key]), (index, key)

    # A state loaded from a checkpoint goes into the tier as its local parts, and comes back a DTensor.
    fresh_inner = torch.optim.AdamW(sharded, lr=1e-2, weight_decay=0.1)
    fresh = OffloadedOptimizer(
        fresh_inner, TensorStateStore(fresh_inner, sharded, HostTier(torch.device("cpu"), sizes))
    )
    fresh.load_state_dict(offloaded.state_dict())
    assert not fresh_inner.state and fresh.store.stats["backing_bytes"] == regions
    for index, state in fresh.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(local_part(value), local_part(saved[index][key])), (index, key)
    store.close()
    fresh.store.close()


@pytest.fixture
def cuda_mesh(tmp_path):
    torch.cuda.set_device(0)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield init_device_mesh("cuda", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; experiments/gpu_check.sh runs it")
def test_on_a_cuda_mesh_offloaded_shards_are_saved_and_loaded_without_touching_the_device(cuda_mesh):
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(distribute_tensor(torch.randn(512, 256, device="cuda"), cuda_mesh, [Shard(0)]))
        for _ in range(2)
    ]
    inner = torch.optim.AdamW(params, lr=1e-2)
    sizes = [expected_state_bytes(inner, p, master=False) for p in params]
    offloaded = OffloadedOptimizer(inner, TensorStateStore(inner, params, HostTier(torch.device("cuda"), sizes)))
    for p in params:
        p.grad = distribute_tensor(torch.randn(512, 256, device="cuda"), cuda_mesh, [Shard(0)])
    offloaded.prefetch()
    offloaded.step()
    offloaded.set_active([])  # every state leaves the device
    offloaded.store.flush()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    saved = offloaded.state_dict()["state"]
    assert torch.cuda.max_memory_allocated() == allocated, "a save copies no offloaded shard onto the device"
    for state in saved.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(state[key], DTensor) and state[key].device_mesh.device_type == "cuda"
            assert state[key].to_local().device.type == "cpu"

    fresh_inner = torch.optim.AdamW(params, lr=1e-2)
    fresh = OffloadedOptimizer(
        fresh_inner, TensorStateStore(fresh_inner, params, HostTier(torch.device("cuda"), sizes))
    )
    torch.cuda.reset_peak_memory_stats()
    fresh.load_state_dict(offloaded.state_dict())
    assert torch.cuda.max_memory_allocated() == allocated, "a resume puts offloaded shards in the tier directly"
    assert not fresh_inner.state
    fresh.prefetch()
    fresh.step()  # fetched back onto the device for the update, as DTensors there
    for p in params:
        assert fresh_inner.state[p]["exp_avg"].to_local().device.type == "cuda"
    offloaded.store.close()
    fresh.store.close()
