"""GRASS on two CPU processes (gloo): equal replicas, equal decisions, and the single-process result."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from tolerances import fp32_sum_rtol

from lightning_grass import GRASSDDPStrategy, GRASSFSDPStrategy
from lightning_grass.strategy_support import check_strategy_supports_grass

RUNNER = Path(__file__).with_name("ddp_run.py")


def run(out, *args):
    out.mkdir()
    # One thread per process in both set-ups, so that every matrix product runs the same kernel.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(RUNNER), str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]


def test_two_ranks_train_the_same_layers_and_match_one_process_with_the_same_global_batch(tmp_path):
    # 48 KiB holds one layer's AdamW state (about 73 KiB) only in part: the active layers' tensors stream.
    offload = ["--offload=disk", "--max-resident-bytes=48KiB"]
    rank0, rank1 = run(tmp_path / "ddp", "--devices=2", "--batch-size=2", *offload)
    (single,) = run(tmp_path / "single", "--devices=1", "--batch-size=2", "--accumulate=2", *offload)

    assert len(rank0["history"]) == 4, "probe end at step 2, then resamples at 4, 6 and 8"
    assert rank0["history"] == rank1["history"], "every rank drew the same layers and measured the same MGN"
    assert torch.equal(rank0["importance"], rank1["importance"])
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), f"replicas diverged at {name}"

    # One process accumulating the ranks' two micro-batches computes the same gradients bitwise: each micro-batch
    # runs the same kernels on the same samples; Lightning halves the loss of each (a power of two, exact
    # through backward), DDP halves each rank's gradient, and a sum of two terms does not depend on their order.
    assert [r["active_layers"] for r in rank0["history"]] == [r["active_layers"] for r in single["history"]]
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, single["weights"][name]), name
    # MGN adds the per-parameter squared norms of a layer in another order under DDP (read at the step, not in
    # gradient hooks): a float32 sum over at most a layer's elements, then a division, a root and an EMA.
    layer_numel = max(rank0["layer_numel"])
    rtol = fp32_sum_rtol(layer_numel + len(rank0["history"]), extra_operations=12)
    assert torch.allclose(rank0["importance"], single["importance"], rtol=rtol, atol=0)
    always_on = sum(8 * n + 4 for n in rank0["always_on_numel"])
    assert rank0["stats"]["peak_resident_bytes"] <= 48 * 2**10 + always_on and rank0["stats"]["bytes_to_device"] > 0


def test_two_ranks_draw_the_same_modules_and_match_one_process(tmp_path):
    offload = ["--offload=cpu", "--max-resident-bytes=24KiB", "--unit=module"]
    rank0, rank1 = run(tmp_path / "ddp", "--devices=2", "--batch-size=2", *offload)
    (single,) = run(tmp_path / "single", "--devices=1", "--batch-size=2", "--accumulate=2", *offload)

    assert len(rank0["units"]) == 4 * 7, "q, k, v, o, gate, up and down of 4 layers"
    draws = [r["active_units"] for r in rank0["history"]]
    assert len(draws) == 4 and len(set(map(tuple, draws))) > 1, "probe end at step 2, then new modules at 4, 6, 8"
    assert rank0["history"] == rank1["history"], "every rank drew the same modules and measured the same MGN"
    assert draws == [r["active_units"] for r in single["history"]]
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), f"replicas diverged at {name}"
        assert torch.equal(weight, single["weights"][name]), name  # as in the layer-wise test above


@pytest.mark.slow  # 20 s: test_master_weights checks the masters in one process; this adds two replicas
def test_bf16_replicas_step_on_equal_fp32_masters(tmp_path):
    offload = ["--offload=disk", "--max-resident-bytes=64KiB", "--precision=bf16-true"]
    rank0, rank1 = run(tmp_path / "ddp", "--devices=2", "--batch-size=2", *offload)
    assert rank0["history"] == rank1["history"]
    for name, weight in rank0["weights"].items():
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, rank1["weights"][name]), name
    masters = [state["master_weight"] for state in rank0["optimizer_state"].values()]
    assert masters and all(master.dtype == torch.float32 for master in masters)
    for index, state in rank0["optimizer_state"].items():
        assert torch.equal(state["master_weight"], rank1["optimizer_state"][index]["master_weight"]), index


def test_registered_names():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["grass_ddp"]["strategy"] is GRASSDDPStrategy
    assert StrategyRegistry["grass_ddp_offload_disk"]["init_params"] == {"offload": "disk"}
    assert GRASSDDPStrategy()._ddp_kwargs["find_unused_parameters"] is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(static_graph=True), "static_graph=True cannot be used with GRASS: DDP's static graph assumes"),
        (dict(find_unused_parameters=False), "find_unused_parameters=False cannot be used with GRASS"),
    ],
)
def test_ddp_settings_that_break_grass_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRASSDDPStrategy(**kwargs)


def test_sharded_strategies_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"does not run on FSDPStrategy \(FSDP1\).*Use strategy='grass_fsdp'"):
        check_strategy_supports_grass(FSDPStrategy())
    check_strategy_supports_grass(GRASSFSDPStrategy())  # FSDP2 through grass_fsdp is accepted
    with pytest.raises(ValueError, match=r"does not run on a plain ModelParallelStrategy.*Use strategy='grass_fsdp'"):
        check_strategy_supports_grass(ModelParallelStrategy())
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # DeepSpeed itself is not installed here
    with pytest.raises(ValueError, match="does not support DeepSpeed: DeepSpeed manages its own optimizer state"):
        check_strategy_supports_grass(deepspeed)
