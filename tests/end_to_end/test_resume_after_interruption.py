"""Checkpoints survive interruptions: a write that fails part-way, and a run killed with SIGKILL."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec.implementations.local
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

RUNNER = Path(__file__).with_name("resume_run.py")


def test_a_checkpoint_write_interrupted_part_way_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = TorchCheckpointIO()
    io.save_checkpoint({"global_step": 4, "weights": torch.arange(1000.0)}, path)
    good = path.read_bytes()

    real_write = fsspec.implementations.local.LocalFileOpener.write

    def write_half_then_fail(self, data):
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 6, "weights": torch.arange(2000.0)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == good
    assert io.load_checkpoint(path)["global_step"] == 4
    assert list(tmp_path.iterdir()) == [path], "no partial file was left next to it"


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_and_finishes_bit_exactly(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, str(RUNNER), str(reference)], check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(RUNNER), str(killed), "--step-seconds=0.5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "ckpt" / "last.ckpt"

    def saved_step():
        return torch.load(last, weights_only=False)["global_step"] if last.exists() else 0

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and saved_step() < 5:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = saved_step()
    assert 5 <= interrupted_at < 12
    assert not (killed / "final.pt").exists()

    subprocess.run([sys.executable, str(RUNNER), str(killed), "--resume"], check=True, capture_output=True, timeout=300)
    expected = torch.load(reference / "final.pt", weights_only=False)
    resumed = torch.load(killed / "final.pt", weights_only=False)
    assert resumed["history"] == expected["history"]
    for name, weight in expected["weights"].items():
        assert torch.equal(weight, resumed["weights"][name]), name
