"""offload_runs: measure never raises for a run (a timeout or the check's time limit is a failed record); budgets."""

import time

import pytest
import torch
from bench_gpu import SMOKE_SHAPE
from offload_runs import CausalLM, ModelShape, Run, _budget, measure

SHAPE = ModelShape(layers=2, hidden=32, intermediate=64, heads=4, vocab=64, seq_len=8, batch_size=1, steps=2)


def test_a_run_past_its_timeout_is_a_failed_record():
    # Importing torch, Lightning and transformers alone takes longer than a second.
    start = time.monotonic()
    results = measure(SHAPE, [Run("slow", "full")], "cpu", timeout_s=1)
    assert results["slow"][0]["failed"] == "timed out after 1 s"
    assert time.monotonic() - start < 10, "the process was killed at its timeout"


def test_runs_the_time_limit_cannot_fit_are_not_started_and_still_reported():
    runs = [Run("first", "full"), Run("second", "lisa")]
    reported = []
    results = measure(
        SHAPE, runs, "cpu", deadline=time.monotonic() + 5, on_result=lambda run, so_far: reported.append(run.name)
    )
    assert reported == ["first", "second"], "each run's record was reported as it was made"
    for run in runs:
        (record,) = results[run.name]
        assert record["failed"].startswith("not started, the check's time limit leaves "), record


def test_a_run_takes_one_budget():
    with pytest.raises(ValueError, match="max_resident_bytes=1 and budget_tensors=2 are two budgets"):
        Run("both", "grass", offload="cpu", max_resident_bytes=1, budget_tensors=2)
    with pytest.raises(ValueError, match="max_resident_bytes=1 and budget_tensors=2 are two budgets"):
        Run("both", "lisa", offload="cpu", max_resident_bytes=1, budget_tensors=2, strategy="grass_fsdp")


def test_a_grass_fsdp_run_takes_a_budget_and_states_it():
    streamed = Run("fsdp", "lisa", offload="cpu", budget_tensors=2, precision="bf16-true", strategy="grass_fsdp")
    assert streamed.describe() == (
        "grass_fsdp on 1 rank, save and resume; lisa, n_active=2; offload=cpu; "
        "budget 2 largest block tensors while stepped; overlap=True; bf16-true"
    )
    bytes_budget = Run("fsdp", "lisa", offload="cpu", max_resident_bytes=3 * 2**20, strategy="grass_fsdp")
    assert bytes_budget.describe() == (
        "grass_fsdp on 1 rank, save and resume; lisa, n_active=2; offload=cpu; budget 3.00 MiB; overlap=True; 32-true"
    )
    unbounded = Run("fsdp", "lisa", strategy="grass_fsdp")
    assert unbounded.describe() == (
        "grass_fsdp on 1 rank, save and resume; lisa, n_active=2; offload=none; budget none; overlap=True; 32-true"
    )


@pytest.mark.slow  # 10 s: tests/end_to_end/test_gpu_check.py runs the same path (fsdp_stream_bf16, its budget)
def test_a_grass_fsdp_run_trains_under_the_budget_it_computed():
    run = Run("fsdp", "lisa", offload="cpu", budget_tensors=1, n_active=1, sample_every=1, strategy="grass_fsdp")
    (record,) = measure(SHAPE, [run], "cpu")["fsdp"]
    assert record["failed"] is None, record["failed"]
    # The largest block tensor, 32 x 64 in fp32 (8 KiB): two moments and AdamW's two temporaries, and a step counter.
    assert record["max_resident_bytes"] == 4 * 32 * 64 * 4 + 4
    assert record["stats"]["peak_resident_tensors"] == 1, "the strategy streamed one tensor at a time"
    assert record["stats"]["bytes_to_backing"] > 0, "states went to the host tier and came back"
    assert (record["saved_at_step"], record["resumed_at_step"], record["final_step"]) == (2, 2, 6)


def test_a_run_takes_one_of_three_budgets_and_at_least_two_chunks():
    with pytest.raises(ValueError, match="budget_tensors=2 and budget_chunks=4 are two budgets"):
        Run("both", "lisa", offload="disk", budget_tensors=2, budget_chunks=4)
    with pytest.raises(ValueError, match="max_resident_bytes=1 and budget_tensors=2 and budget_chunks=4 are three"):
        Run("all", "lisa", offload="disk", max_resident_bytes=1, budget_tensors=2, budget_chunks=4)
    with pytest.raises(ValueError, match="budget_chunks=1 cuts no tensor into chunks; give at least 2"):
        Run("one", "lisa", offload="disk", budget_chunks=1)
    chunked = Run("chunked", "lisa", offload="disk", offload_always_on=True, budget_chunks=4, precision="bf16-true")
    assert chunked.describe() == (
        "lisa, n_active=2; offload=disk; offload_always_on=True; budget 2 of 4 chunks of rows of the largest tensor "
        "while stepped; overlap=True; bf16-true"
    )


@pytest.mark.parametrize(
    ("precision", "per_element"),
    [
        # AdamW's two moments and its for-loop's two temporaries, in fp32.
        ("32-true", 16),
        # The same in fp32 on a master, with the master and its gradient.
        ("bf16-true", 24),
    ],
)
def test_budget_chunks_cuts_the_largest_offloaded_tensor_into_that_many_chunks(precision, per_element):
    module = CausalLM(SMOKE_SHAPE, torch.bfloat16 if precision == "bf16-true" else torch.float32, "cpu")
    mlp = 3 * SMOKE_SHAPE.layers  # gate, up and down: 176 x 64 or 64 x 176, above either budget
    always_on = Run("all", "lisa", offload="disk", offload_always_on=True, budget_chunks=4, precision=precision)
    # The embedding and head (256 x 64) are offloaded and the largest: 4 chunks of 64 rows, one in half the budget.
    assert _budget(module, always_on) == {
        "max_resident_bytes": 2 * (64 * 64 * per_element + 4),
        "largest_tensor_bytes": 256 * 64 * per_element + 4,
        "largest_tensor_chunks": 4,
        "chunked_tensors": 2 + mlp,
    }
    # Without offload_always_on the largest offloaded tensor is a block's gate projection, 176 x 64: 44 rows.
    blocks = Run("blocks", "lisa", offload="disk", budget_chunks=4, precision=precision)
    assert _budget(module, blocks) == {
        "max_resident_bytes": 2 * (44 * 64 * per_element + 4),
        "largest_tensor_bytes": 176 * 64 * per_element + 4,
        "largest_tensor_chunks": 4,
        "chunked_tensors": mlp,
    }
    unbounded = _budget(module, Run("none", "lisa", offload="disk", precision=precision))
    assert unbounded == {
        "max_resident_bytes": None,
        "largest_tensor_bytes": 176 * 64 * per_element + 4,
        "largest_tensor_chunks": 1,
        "chunked_tensors": 0,
    }
