"""GRASSStrategy's CUDA paths: pinned host buffers, the copy stream and its events, the disk tier staged
through host memory, per-tensor streaming and fp32 masters on the device. Run by experiments/gpu_check.sh.

Attention is the eager implementation, so every kernel of the compared runs is deterministic, and the
copy stream only copies: offloaded and resident runs are compared bitwise.
"""

import copy

import pytest
import torch
from conftest import VOCAB, TinyCausalLM, make_trainer, token_batches

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.offload import MASTER_KEY, HostTier, OffloadedOptimizer, TensorStateStore

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; experiments/gpu_check.sh runs it"),
]


def fit_on_cuda(tmp_path, precision, **strategy_settings):
    module = TinyCausalLM(weight_decay=0.1, attn_implementation="eager")
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=0)
    strategy = GRASSStrategy(offload_dir=tmp_path, **strategy_settings)
    trainer = make_trainer(
        accelerator="cuda", devices=1, max_steps=8, strategy=strategy, callbacks=[callback], precision=precision
    )
    trainer.fit(module, token_batches())
    return module, trainer


@pytest.mark.parametrize(
    ("offload", "budget", "overlap", "precision"),
    [
        ("cpu", None, True, "32-true"),
        ("cpu", "48KiB", True, "32-true"),
        ("cpu", "48KiB", False, "32-true"),
        ("disk", "48KiB", True, "32-true"),
        ("cpu", "48KiB", True, "bf16-true"),
        ("disk", None, True, "bf16-true"),
    ],
)
def test_offloaded_runs_are_bitwise_the_resident_run(tmp_path, offload, budget, overlap, precision):
    reference, _ = fit_on_cuda(tmp_path, precision, offload="none")
    module, trainer = fit_on_cuda(tmp_path, precision, offload=offload, max_resident_bytes=budget, overlap=overlap)
    assert trainer.strategy.root_device.type == "cuda"
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), module.parameters(), strict=True))
    stats = trainer.strategy.offload_stats
    assert stats["bytes_to_backing"] > 0
    if budget is not None:
        always_on = trainer.optimizers[0].unmanaged_state_bytes()  # the embeddings', head's and norm's, resident
        assert stats["peak_resident_bytes"] <= 48 * 2**10 + always_on


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
