"""offload_runs: measure never raises for a run (a timeout or the check's time limit is a failed record), a run
killed after its measurements keeps them, a run's process group is destroyed after its line; budgets; CUDA-event
step times."""

import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import offload_runs
import pytest
import torch
from bench_gpu import SMOKE_SHAPE
from offload_runs import CausalLM, Meter, ModelShape, Run, _budget, _main, _run_job, measure

SHAPE = ModelShape(layers=2, hidden=32, intermediate=64, heads=4, vocab=64, seq_len=8, batch_size=1, steps=2)


def test_a_run_past_its_timeout_is_a_failed_record():
    # Importing torch, Lightning and transformers alone takes longer than a second.
    start = time.monotonic()
    results = measure(SHAPE, [Run("slow", "full")], "cpu", timeout_s=1)
    assert results["slow"][0]["failed"] == "timed out after 1 s"
    assert time.monotonic() - start < 10, "the process was killed at its timeout"


def fake_run(tmp_path, body):
    script = tmp_path / "fake_run.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_a_run_killed_at_its_timeout_after_printing_its_measurements_keeps_them(tmp_path):
    # The process prints its line (as offload_runs' own does: flushed at once), then hangs, as at NCCL's exit.
    command = fake_run(
        tmp_path,
        """
        import json, time
        print("Lightning's chatter on stdout")
        print(json.dumps({"peak_memory_bytes": 7, "step_seconds": [0.5]}), flush=True)
        print("{not json", flush=True)
        time.sleep(60)
        """,
    )
    start = time.monotonic()
    record = _run_job(command, timeout_s=3)
    assert time.monotonic() - start < 20, "the process was killed at its timeout"
    assert record["failed"] is None
    assert record["failed_after_measurements"] == "timed out after 3 s"
    assert (record["peak_memory_bytes"], record["step_seconds"]) == (7, [0.5])
    assert record["wall_seconds"] >= 3


def test_a_run_killed_at_its_timeout_before_printing_is_a_failed_record(tmp_path):
    command = fake_run(tmp_path, 'import time\nprint("starting", flush=True)\ntime.sleep(60)\n')
    record = _run_job(command, timeout_s=2)
    assert record["failed"] == "timed out after 2 s" and "failed_after_measurements" not in record


def test_a_run_that_ends_keeps_its_last_json_line_even_if_it_fails_after_it(tmp_path):
    command = fake_run(tmp_path, 'import json\nprint(json.dumps({"a": 1}))\nprint("at exit")\n')
    record = _run_job(command, timeout_s=60)
    assert record["a"] == 1 and record["failed"] is None and "failed_after_measurements" not in record
    crash = 'import json\nprint(json.dumps({"a": 2}), flush=True)\nraise SystemExit("teardown: NCCL error")\n'
    record = _run_job(fake_run(tmp_path, crash), timeout_s=60)
    assert (record["a"], record["failed"], record["failed_after_measurements"]) == (2, None, "teardown: NCCL error")
    failing = _run_job(fake_run(tmp_path, 'raise SystemExit("setup: bad budget")\n'), timeout_s=60)
    assert failing == {"failed": "setup: bad budget", "wall_seconds": failing["wall_seconds"]}
    silent = _run_job(fake_run(tmp_path, 'print("no figures")\n'), timeout_s=60)
    assert silent["failed"] == "printed no measurements; its last line of output: no figures"


def test_the_process_group_is_destroyed_after_the_line_is_printed(monkeypatch, capsys):
    job = {"shape": {}, "run": {}, "accelerator": "cpu"}
    with tempfile.TemporaryDirectory() as folder:
        store = torch.distributed.FileStore(str(Path(folder) / "store"), 1)

        def fit_that_leaves_a_group(shape, run, accelerator):
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
            return {"peak_memory_bytes": 1}

        monkeypatch.setattr(offload_runs, "ModelShape", lambda **shape: None)
        monkeypatch.setattr(offload_runs, "Run", lambda **run: None)
        monkeypatch.setattr(offload_runs, "train", fit_that_leaves_a_group)
        _main(job)
        assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"peak_memory_bytes": 1}
        assert not torch.distributed.is_initialized()

        def fit_that_fails(shape, run, accelerator):
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
            raise RuntimeError("the second fit failed")

        monkeypatch.setattr(offload_runs, "train", fit_that_fails)
        with pytest.raises(RuntimeError, match="the second fit failed"):
            _main(job)
        assert not torch.distributed.is_initialized(), "destroyed when the run fails too"


class FakeEvent:
    """A CUDA event on a clock that reads only when it is asked (as a recorded event's time)."""

    clock = 0.0

    def __init__(self):
        self.at = FakeEvent.clock
        self.synchronized = False

    def synchronize(self):
        self.synchronized = True

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3  # in milliseconds, as CUDA's


class FakeTrainer:
    global_step = 0

    class strategy:  # noqa: N801
        offload_stats = {"bytes_to_device": 3}


def test_on_cuda_a_step_is_timed_from_the_previous_steps_end_with_events_and_no_synchronisation(monkeypatch):
    events = []

    def record():
        events.append(FakeEvent())
        return events[-1]

    monkeypatch.setattr(offload_runs, "_recorded_event", record)
    # On this CPU-only torch, a torch.cuda.synchronize() between steps would raise.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: pytest.fail("synchronised between steps"))
    meter = Meter(cuda=True)
    meter.on_train_start(FakeTrainer(), None)
    # Step 1 from its batch start (t = 1) to its end (t = 3); step 2 from t = 3 to t = 7, including the time
    # between step 1's end and step 2's batch start (t = 4), when write-backs may still run.
    for when, hook in [(1.0, "start"), (3.0, "end"), (4.0, "start"), (7.0, "end")]:
        FakeEvent.clock = when
        getattr(meter, f"on_train_batch_{hook}")()
    assert meter.seconds == [] and len(events) == 3, "events are read at the end only; one per step and a start"
    meter.on_train_end(FakeTrainer(), None)
    assert meter.seconds == pytest.approx([2.0, 4.0])
    assert events[-1].synchronized and meter.stats == {"bytes_to_device": 3}


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
