"""GRASS on FSDP2 over two CPU processes (gloo): equal draws, the one-process result, the byte budget, frozen blocks,
bf16 (mixed, and true on fp32 masters), resume."""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from conftest import TinyCausalLM, make_trainer, tiny_llama_config, token_batches
from tolerances import fp32_sum_rtol
from torch.distributed.checkpoint import FileSystemReader
from transformers import LlamaForCausalLM

from lightning_grass import GRASSCallback, GRASSFSDPStrategy, GRASSStrategy, estimate_memory
from lightning_grass.errors import SettingValueError
from lightning_grass.sampling.layer_discovery import discover_layers
from lightning_grass.sampling.sampling_units import sampling_units

RUNNER = Path(__file__).with_name("fsdp_run.py")
STEPS, LR = 14, 1e-3


def run(out, *args, expect_ok=True):
    out.mkdir()
    # One thread per process in every set-up, so that every matrix product runs the same kernel.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(RUNNER), str(out), f"--steps={STEPS}", f"--lr={LR}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    if not expect_ok:
        return result
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]


#: Every state shard in host memory, streamed under a budget of two of the largest shards while stepped.
STREAMED = ("--offload=cpu", "--budget-tensors=2", "--offload-always-on")


def streamed_peak_estimate(budget, precision):
    """estimate_memory's device bytes of one rank's offloaded states for STREAMED on 2 ranks (CPU: for-loop AdamW)."""
    model = TinyCausalLM(lr=LR, weight_decay=0.1).model
    estimate = estimate_memory(
        model,
        n_active=1,
        precision=precision,
        offload="cpu",
        max_resident_bytes=budget,
        offload_always_on=True,
        shards=2,
        foreach=False,
    )
    return estimate.master_weights + estimate.optimizer_states + estimate.step_workspace


# The tests that read the two-rank run go to one pytest-xdist worker (--dist loadgroup), which runs it once.
with_fsdp_run = pytest.mark.xdist_group("fsdp.fsdp_run")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Two ranks, batch 8 each, every state shard streamed from host memory, a sharded checkpoint every 4 steps."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    return out, run(out, "--devices=2", "--batch-size=8", *STREAMED, "--save-every=4")


@with_fsdp_run
def test_two_ranks_draw_the_same_layers_and_match_one_process(fsdp_run, tmp_path):
    _, (rank0, rank1) = fsdp_run
    assert rank0["blocks_sharded"] == [True] * 4, (
        "a plain LightningModule (no configure_model): the strategy sharded it"
    )
    assert len(rank0["history"]) == 5, "probe end at step 2, resamples at 5, 8, 11 and 14"
    assert rank0["history"] == rank1["history"], "every rank drew the same layers and measured the same MGN"
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), f"gathered weights differ between ranks at {name}"

    # Each rank's states and masters on the device stayed within its budget, at every store call: the budget is
    # two of the largest shards while stepped, and the run streamed (each shard fetched for its update only).
    for rank in (rank0, rank1):
        assert 0 < rank["stats"]["peak_resident_bytes"] <= rank["budget"]
        assert rank["stats"]["bytes_to_device"] > 0 and rank["stats"]["resident_bytes"] == 0
    # estimate_memory sizes one rank of grass_fsdp by the same arithmetic: its peak is the measured one, exactly.
    assert streamed_peak_estimate(rank0["budget"], "32-true") == rank0["stats"]["peak_resident_bytes"]

    # One process accumulating the ranks' two micro-batches of 8 computes the same gradients bitwise: the same
    # kernels on the same samples; Lightning halves each micro-batch's loss and FSDP2 halves each rank's gradient
    # (powers of two, exact); a sum of two terms does not depend on their order; AdamW is elementwise, so
    # stepping shards is stepping the whole tensor.
    (accumulated,) = run(tmp_path / "acc", "--devices=1", "--batch-size=8", "--accumulate=2")
    assert [r["active_layers"] for r in accumulated["history"]] == [r["active_layers"] for r in rank0["history"]]
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, accumulated["weights"][name]), name
    # MGN from the same gradients: the ranks sum the squares of their shards and all-reduce them, one process
    # takes each tensor's norm whole. Another order of a float32 sum of at most a layer's elements, then a
    # square root, a division and the window's mean.
    layer_numel = sum(p.numel() for p in LlamaForCausalLM(tiny_llama_config()).model.layers[0].parameters())
    rtol = fp32_sum_rtol(layer_numel + STEPS, extra_operations=8)
    for ours, theirs in zip(rank0["history"], accumulated["history"], strict=True):
        assert (ours["importance"] is None) == (theirs["importance"] is None)
        if ours["importance"] is not None:
            assert ours["importance"] == pytest.approx(theirs["importance"], rel=rtol, abs=0)


def test_two_ranks_train_exactly_the_drawn_modules_inside_sharded_blocks_and_match_one_process(tmp_path):
    # FSDP2 shards each parameter on its own, so a block can train some of its parameters: the frozen ones get no
    # gradient and no reduce-scatter.
    rank0, rank1 = run(tmp_path / "fsdp", "--devices=2", "--batch-size=8", "--unit=module", "--n-active=1", *STREAMED)
    always_on = ["model.lm_head.weight", "model.model.embed_tokens.weight", "model.model.norm.weight"]
    assert rank0["history"] == rank1["history"], "every rank drew the same modules and measured the same MGN"
    trained = [step for step in rank0["steps"] if step["phase"] == "train"]
    assert len(trained) == STEPS - 2
    for step in trained:
        assert step["with_grad_names"] == sorted(step["active_unit_names"] + always_on)
        assert not any("layernorm" in name for name in step["with_grad_names"]), "the blocks' norms stay frozen"
    assert len({tuple(step["active_unit_names"]) for step in trained}) > 1, "several draws of modules"
    for rank in (rank0, rank1):
        assert 0 < rank["stats"]["peak_resident_bytes"] <= rank["budget"]
    (accumulated,) = run(tmp_path / "acc", "--devices=1", "--batch-size=8", "--accumulate=2", "--unit=module")
    assert [r["active_units"] for r in accumulated["history"]] == [r["active_units"] for r in rank0["history"]]
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), f"gathered weights differ between ranks at {name}"
        assert torch.equal(weight, accumulated["weights"][name]), name  # as the layer-wise test explains


@with_fsdp_run
@pytest.mark.slow  # 9 s: the accumulated one-process run above is the bitwise reference in the default run
def test_two_ranks_stay_within_rounding_of_one_process_with_the_whole_batch(fsdp_run, tmp_path):
    _, (rank0, _) = fsdp_run
    # One process with batch 16 takes the loss mean over 16 samples in one reduction and sums weight gradients
    # over 16 rows at once: other float32 rounding than two halves averaged. An AdamW element whose gradient is
    # near the rounding level can take a different sign in one step and move 2 * lr apart, so 2 * lr bounds
    # the difference (measured: below 1e-6).
    (batch16,) = run(tmp_path / "b16", "--devices=1", "--batch-size=16")
    assert [r["active_layers"] for r in batch16["history"]] == [r["active_layers"] for r in rank0["history"]]
    for name, weight in rank0["weights"].items():
        assert torch.allclose(weight, batch16["weights"][name], rtol=0, atol=2 * LR), name


@with_fsdp_run
def test_frozen_blocks_have_no_gradient_and_no_resident_state(fsdp_run):
    _, (rank0, rank1) = fsdp_run
    layer_grad_bytes = None
    for step in rank0["steps"]:
        if step["phase"] == "probe":
            continue  # probing measures every layer, then removes the gradients: no step changes anything
        assert step["with_grad"] == step["active"], "only the active block holds a gradient"
        assert set(step["with_state_before_step"]) <= set(step["active"]), "inactive blocks' states are offloaded"
        assert set(step["with_state_after_step"]) <= set(step["active_after"])
        # The gradient shards are the same size at every step: one block plus the always-on modules.
        layer_grad_bytes = layer_grad_bytes or step["grad_bytes"]
        assert step["grad_bytes"] == layer_grad_bytes
    assert rank0["steps"] == rank1["steps"]


@with_fsdp_run
def test_checkpoint_holds_offloaded_states_and_resumes_bit_exactly(fsdp_run, tmp_path):
    out, ranks = fsdp_run
    rank0 = ranks[0]
    # At step 8 the callback had just drawn layer 3 for layer 2: layer 2's 9 tensors and the 3 always-on ones had
    # states, all in host memory (streamed: nothing stays resident between steps). The checkpoint holds them all.
    step8 = next(save for save in rank0["saves"] if save["step"] == 8)
    assert step8 == {"step": 8, "saved_states": 12, "resident_states": 0}
    checkpoint = out / "ckpt" / "epoch=1-step=8.ckpt"
    keys = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    saved_exp_avg = {key for key in keys if key.startswith("optimizer_0.state.") and key.endswith(".exp_avg")}
    assert len(saved_exp_avg) == 12 and any(".layers.2." in key for key in saved_exp_avg)

    resumed = run(tmp_path / "resumed", "--devices=2", "--batch-size=8", *STREAMED, f"--resume={checkpoint}")
    for full, part in zip(ranks, resumed, strict=True):
        assert part["history"] == full["history"], "the sampler resumed where it stopped"
        for name, weight in full["weights"].items():
            assert torch.equal(part["weights"][name], weight), name
        assert sorted(part["final_state"]) == sorted(full["final_state"])
        for name, state in full["final_state"].items():
            for key, value in state.items():
                assert torch.equal(part["final_state"][name][key], value), (name, key)


@pytest.mark.slow  # 34 s: the sharded-checkpoint resume test loads the same checkpoints in the default run
def test_validate_from_a_sharded_checkpoint_loads_its_weights(tmp_path):
    trained = run(tmp_path / "fit", "--devices=2", "--steps=4", "--save-every=4", "--offload=cpu")
    checkpoint = tmp_path / "fit" / "ckpt" / "epoch=0-step=4.ckpt"
    validated = run(tmp_path / "validate", "--devices=2", f"--validate-from={checkpoint}")
    for fit_rank, validate_rank in zip(trained, validated, strict=True):
        for name, weight in fit_rank["weights"].items():
            assert torch.equal(weight, validate_rank["weights"][name]), name


def test_bf16_mixed_survives_reactivating_a_block_frozen_at_the_first_forward(tmp_path):
    # lisa trains 1 of 4 blocks from the first step, so 3 blocks are frozen when the first forward runs; with
    # sample_every=2 blocks frozen then are drawn later. FSDP2 shards with MixedPrecisionPolicy(bf16, fp32).
    args = ["--devices=2", "--precision=bf16-mixed", "--mode=lisa", "--sample-every=2", "--offload=cpu"]
    rank0, rank1 = run(tmp_path / "bf16", *args)
    first = rank0["history"][0]["active_layers"]
    drawn = {layer for record in rank0["history"] for layer in record["active_layers"]}
    assert drawn - set(first), "a block frozen at the first forward was trained later"
    assert rank0["history"] == rank1["history"]
    for name, weight in rank0["weights"].items():
        assert weight.dtype == torch.float32 and torch.isfinite(weight).all(), name
        assert torch.equal(weight, rank1["weights"][name]), name
    for step in rank0["steps"]:
        assert step["with_grad"] == step["active"]


def test_bf16_true_shards_step_on_fp32_masters_as_plain_adamw_does_on_the_same_shard(tmp_path):
    # bf16 weights, every state shard (fp32 master and moments) streamed from host memory under the budget.
    rank0, rank1 = run(tmp_path / "bf16", "--devices=2", "--precision=bf16-true", "--steps=6", *STREAMED)
    assert streamed_peak_estimate(rank0["budget"], "bf16-true") == rank0["stats"]["peak_resident_bytes"]
    for rank in (rank0, rank1):
        assert 0 < rank["stats"]["peak_resident_bytes"] <= rank["budget"]
        check = rank["master_check"]
        before, after = check["before"], check["after"]
        assert before["master_weight"].dtype == torch.float32 and check["weight_after"].dtype == torch.bfloat16
        # The same update by a plain fp32 AdamW over this rank's shard: the master, the moments and the step
        # counter from before the step, the bf16 gradient in fp32. AdamW is elementwise and both run torch's
        # for-loop kernels on the same values, so the results are bitwise equal.
        master = before["master_weight"].clone()
        master.grad = check["grad"]
        reference = torch.optim.AdamW([master], lr=LR, weight_decay=0.1)
        reference.state[master] = {key: before[key].clone() for key in ("step", "exp_avg", "exp_avg_sq")}
        reference.step()
        assert torch.equal(after["master_weight"], master), check["name"]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after[key], reference.state[master][key]), (check["name"], key)
        assert torch.equal(check["weight_after"], master.to(torch.bfloat16)), "the weight is its master, rounded"
    assert rank0["history"] == rank1["history"]
    for name, weight in rank0["weights"].items():
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, rank1["weights"][name]), name


@pytest.mark.slow
def test_without_the_all_trainable_lazy_init_bf16_reactivation_fails(tmp_path):
    # The pitfall the strategy's lazy initialisation avoids, shown by skipping it.
    args = ["--devices=2", "--precision=bf16-mixed", "--mode=lisa", "--sample-every=2", "--no-lazy-init"]
    result = run(tmp_path / "bf16", *args, expect_ok=False)
    assert result.returncode != 0
    assert "attempting to assign a gradient with dtype" in result.stderr


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["grass_fsdp"]["strategy"] is GRASSFSDPStrategy
    assert StrategyRegistry["grass_fsdp_offload_disk"]["init_params"] == {"offload": "disk"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(offload="nvme"), "offload='nvme' is not supported"),
        (dict(tensor_parallel_size=2), "tensor_parallel_size=2 is not supported by grass_fsdp"),
        (dict(save_distributed_checkpoint=False), "save_distributed_checkpoint=False is not supported"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(SettingValueError, match=message):
        GRASSFSDPStrategy(**kwargs)


def test_a_callback_sampling_another_container_than_the_sharded_one_is_refused_naming_both():
    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
            self.decoder = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    module = TwoStacks()
    strategy = GRASSFSDPStrategy(layers="encoder", offload="none")
    strategy._sharded_path = discover_layers(module, "encoder").path  # what _shard records at setup
    with pytest.raises(SettingValueError) as refused:
        decoder = discover_layers(module, "decoder")
        strategy.on_layer_map(decoder, sampling_units(decoder))
    assert str(refused.value).startswith(
        "GRASSFSDPStrategy sharded one group per block at 'encoder', but GRASSCallback samples the blocks at 'decoder'"
    )
    encoder = discover_layers(module, "encoder")
    strategy.on_layer_map(encoder, sampling_units(encoder))
    assert strategy._layer_map.path == "encoder"


def test_grass_fsdp_on_one_process_probes_and_draws_as_grass_does():
    def fit(strategy):
        callback = GRASSCallback(probe_steps=2, sample_every=2, seed=0)
        trainer = make_trainer(max_steps=4, strategy=strategy, callbacks=[callback])
        trainer.fit(TinyCausalLM(lr=LR, weight_decay=0.1), token_batches())
        return trainer, callback

    _, reference = fit(GRASSStrategy(offload="none"))
    with mock.patch.dict(os.environ):  # Lightning sets MASTER_ADDR and MASTER_PORT for the process group
        try:
            trainer, sharded = fit(GRASSFSDPStrategy(offload="none", process_group_backend="gloo"))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    assert trainer.global_step == 4
    assert sharded.active_layers == reference.active_layers
