"""GRASSStrategy's CUDA paths: the pinned host buffer, the copy streams and their events, the disk tier staged
through host memory, per-tensor and chunked streaming, fp32 masters on the device, fused AdamW, 16-mixed, and
the byte budget against what the caching allocator saw. Run by experiments/gpu_check.sh.

Attention is the eager implementation, so every kernel of the compared runs is deterministic, and the
copy stream only copies: offloaded and resident runs are compared bitwise.
"""

import copy

import pytest
import torch
from conftest import VOCAB, TinyCausalLM, make_trainer, tiny_llama_config, token_batches
from transformers import LlamaForCausalLM

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.offload import (
    MASTER_KEY,
    DiskTier,
    HostTier,
    OffloadedOptimizer,
    TensorStateStore,
    device_bytes_while_stepped,
    expected_state_bytes,
    expected_state_tensors,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; experiments/gpu_check.sh runs it"),
]


def two_tensors_budget(precision, optimizer="adamw"):
    """Room for two of the largest layer tensors (gate_proj) while stepped, by the library's arithmetic."""
    module = TinyCausalLM(optimizer=optimizer).to("cuda")
    optimizer = module.configure_optimizers()
    largest = module.model.model.layers[0].mlp.gate_proj.weight
    return 2 * device_bytes_while_stepped(optimizer, largest, master=precision == "bf16-true")


def fit_on_cuda(tmp_path, precision, optimizer="adamw", **strategy_settings):
    module = TinyCausalLM(weight_decay=0.1, attn_implementation="eager", optimizer=optimizer)
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0)
    strategy = GRASSStrategy(offload_dir=tmp_path, **strategy_settings)
    trainer = make_trainer(
        accelerator="cuda", devices=1, max_steps=8, strategy=strategy, callbacks=[callback], precision=precision
    )
    trainer.fit(module, token_batches())
    return module, trainer


@pytest.mark.parametrize(
    ("offload", "streamed", "overlap", "precision", "optimizer"),
    [
        ("cpu", False, True, "32-true", "adamw"),
        ("cpu", True, True, "32-true", "adamw"),
        ("cpu", True, False, "32-true", "adamw"),
        ("disk", True, True, "32-true", "adamw"),
        ("cpu", True, True, "bf16-true", "adamw"),
        ("disk", False, True, "bf16-true", "adamw"),
        ("cpu", True, True, "32-true", "fused_adamw"),
        ("cpu", True, True, "bf16-true", "fused_adamw"),
        ("cpu", True, True, "16-mixed", "adamw"),
        ("cpu", False, True, "16-mixed", "fused_adamw"),
    ],
)
def test_offloaded_runs_are_bitwise_the_resident_run(tmp_path, offload, streamed, overlap, precision, optimizer):
    budget = two_tensors_budget(precision, optimizer) if streamed else None
    reference, _ = fit_on_cuda(tmp_path, precision, optimizer, offload="none")
    module, trainer = fit_on_cuda(
        tmp_path, precision, optimizer, offload=offload, max_resident_bytes=budget, overlap=overlap
    )
    assert trainer.strategy.root_device.type == "cuda"
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), module.parameters(), strict=True))
    stats = trainer.strategy.offload_stats
    assert stats["bytes_to_backing"] > 0
    if budget is not None:
        always_on = trainer.optimizers[0].unmanaged_state_bytes()  # the embeddings', head's and norm's, resident
        assert stats["peak_resident_bytes"] <= budget + always_on


@pytest.mark.parametrize(
    ("offload", "precision", "optimizer"),
    [
        ("cpu", "32-true", "adamw"),
        ("disk", "32-true", "adamw"),
        ("cpu", "bf16-true", "adamw"),
        ("cpu", "32-true", "fused_adamw"),
        ("cpu", "bf16-true", "fused_adamw"),
    ],
)
def test_chunked_runs_are_bitwise_the_resident_run(tmp_path, offload, precision, optimizer):
    # Half of what gate_proj needs while stepped: every tensor of its size, the always-on ones included, streams in
    # chunks of rows through the copy streams.
    budget = two_tensors_budget(precision, optimizer) // 4
    reference, _ = fit_on_cuda(tmp_path, precision, optimizer, offload="none")
    module, trainer = fit_on_cuda(
        tmp_path, precision, optimizer, offload=offload, max_resident_bytes=budget, offload_always_on=True
    )
    store = trainer.strategy._offloaded.store
    assert any(rows is not None for rows in store.rows), "tensors were cut into chunks"
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), module.parameters(), strict=True))
    assert trainer.strategy.offload_stats["peak_resident_bytes"] <= budget


def test_masters_on_cuda_equal_fp32_adamw_fed_the_same_gradients():
    torch.manual_seed(0)
    model = copy.deepcopy(TinyCausalLM(attn_implementation="eager").model).to("cuda", torch.bfloat16)
    params = list(model.parameters())
    layer_params = [p for layer in model.model.layers for p in layer.parameters()]
    inner = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    store = TensorStateStore(inner, layer_params, HostTier(torch.device("cuda")), 4 * 2**10 * 12, params)
    offloaded = OffloadedOptimizer(inner, store, params)
    reference = [p.detach().float().requires_grad_() for p in params]
    plain = torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        offloaded.prefetch()
        tokens = torch.randint(0, VOCAB, (2, 12), generator=generator).cuda()
        offloaded.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        for ref, p in zip(reference, params, strict=True):
            ref.grad = p.grad.float()
        offloaded.step()
        plain.step()
    state = offloaded.state_dict()["state"]
    for index, (ref, p) in enumerate(zip(reference, params, strict=True)):
        assert torch.equal(state[index][MASTER_KEY].cuda(), ref.detach()), index
        assert torch.equal(p.detach(), ref.detach().to(torch.bfloat16)), index
    store.close()


@pytest.mark.parametrize(
    ("dtype", "optimizer", "tier"),
    [
        (torch.float32, "foreach", "cpu"),
        (torch.bfloat16, "foreach", "cpu"),
        (torch.bfloat16, "fused", "cpu"),
        (torch.float32, "for-loop", "disk"),
    ],
)
@pytest.mark.parametrize("tensors", [1, 2, 3])
def test_what_the_allocator_sees_during_a_streamed_step_stays_within_the_budget(
    tmp_path, dtype, optimizer, tier, tensors
):
    """Everything the store and the step allocate on the device, read from ``max_memory_allocated``.

    Every parameter is offloaded, so nothing outside the store is stepped. The model is large enough that
    the caching allocator's rounding (each block to a multiple of 512 bytes) is under 1% of the budget.
    """
    torch.manual_seed(0)
    config = tiny_llama_config(2, hidden_size=256, intermediate_size=704, attn_implementation="eager")
    model = LlamaForCausalLM(config).to("cuda", dtype)
    params = list(model.parameters())
    flags = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}[optimizer]
    inner = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **flags)
    masters = params if dtype == torch.bfloat16 else []
    mastered = {id(p) for p in masters}
    budget = tensors * max(device_bytes_while_stepped(inner, p, id(p) in mastered) for p in params)
    backing = HostTier(
        torch.device("cuda"),
        [expected_state_bytes(inner, p, id(p) in mastered) for p in params],
        [expected_state_tensors(inner, p, id(p) in mastered) for p in params],
    )
    store = TensorStateStore(inner, params, backing if tier == "cpu" else DiskTier(tmp_path), budget, masters)
    offloaded = OffloadedOptimizer(inner, store, masters)
    offloaded.set_active(list(range(len(params))))
    generator = torch.Generator().manual_seed(1)
    rounding = 512 * 8 * (tensors + 2)  # blocks of up to 8 tensors (state, master, gradient, temporaries) in flight
    for _ in range(4):
        tokens = torch.randint(0, VOCAB, (2, 16), generator=generator).cuda()
        offloaded.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        offloaded.prefetch()
        offloaded.step()
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before <= budget + rounding
        assert store.stats["peak_resident_bytes"] <= budget
    store.close()
