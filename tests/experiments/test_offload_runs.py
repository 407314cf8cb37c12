"""offload_runs.measure never raises for a run: a timeout or the check's time limit is a failed record."""

import time

import pytest
from offload_runs import ModelShape, Run, measure

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
    with pytest.raises(ValueError, match="grass_fsdp offers no budget"):
        Run("fsdp", "lisa", budget_tensors=2, strategy="grass_fsdp")
