"""grass-train survives interruptions: SIGKILL and SIGTERM mid-epoch, then ``ckpt_path=last``, bit-exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
# 64 examples in batches of 8: 8 steps per epoch. 12 steps cross an epoch boundary; checkpoints every 3
# steps fall mid-epoch (3, 6) and after the boundary (9), and validation runs at steps 4 and 8.
RUN = [
    "model=scratch_llama",
    "data.num_train=64",
    "data.num_val=8",
    "data.batch_size=8",
    "trainer.max_steps=12",
    "trainer.val_check_interval=4",
    "sampler.probe_steps=2",
    "sampler.sample_every=3",
    "model.eval_examples=4",
    "logger=none",
    "callbacks=none",
    "ckpt_every_n_steps=3",
]


def grass_train(output_dir, *overrides, check=True):
    command = [sys.executable, "-m", "lightning_grass.app.train", *RUN, f"paths.output_dir={output_dir}", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def signal_at(step, name):
    return [
        "+callbacks.stop._target_=signal_at_step.SignalAtStep",
        f"+callbacks.stop.step={step}",
        f"+callbacks.stop.signal={name}",
    ]


def saved_step(output_dir):
    return torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def assert_same_run(resumed_dir, reference_dir):
    expected = load_file(reference_dir / "model" / "model.safetensors")
    resumed = load_file(resumed_dir / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, weight in expected.items():
        assert torch.equal(weight, resumed[name]), name
    expected_metrics = json.loads((reference_dir / "metrics.json").read_text())
    resumed_metrics = json.loads((resumed_dir / "metrics.json").read_text())
    for key in ("exact_match_after", "history", "draw_share", "layer_selection_counts", "train/loss", "val/loss"):
        assert resumed_metrics.get(key) == expected_metrics.get(key), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    grass_train(output_dir)
    assert saved_step(output_dir) == 12, "the end of training writes last.ckpt too"
    return output_dir


def test_a_run_killed_mid_epoch_resumes_with_ckpt_path_last_bit_exactly(tmp_path, reference):
    # The same command starts the job and continues it, as a scheduler that restarts jobs would run it.
    killed = grass_train(tmp_path, "ckpt_path=last", *signal_at(7, "SIGKILL"), check=False)
    assert killed.returncode == -signal.SIGKILL
    assert f"no checkpoint in {tmp_path / 'checkpoints'} yet: starting from step 0" in killed.stdout
    assert saved_step(tmp_path) == 6, "the checkpoint of step 6, in the middle of the first epoch"
    assert not (tmp_path / "metrics.json").exists()

    resumed = grass_train(tmp_path, "ckpt_path=last")
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert_same_run(tmp_path, reference)


def test_sigterm_saves_a_checkpoint_exits_with_143_and_the_run_resumes_bit_exactly(tmp_path, reference):
    stopped = grass_train(tmp_path, *signal_at(5, "SIGTERM"), check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert saved_step(tmp_path) == 5, "saved at the end of the step SIGTERM arrived in, not at the last multiple of 3"
    assert f"stopped by SIGTERM after step 5; resume with ckpt_path=last paths.output_dir={tmp_path}" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    assert not (tmp_path / "metrics.json").exists()

    grass_train(tmp_path, "ckpt_path=last")
    assert_same_run(tmp_path, reference)


def test_bad_checkpoint_settings_stop_before_any_work(tmp_path):
    result = grass_train(tmp_path, "ckpt_path=/nowhere/x.ckpt", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ckpt_path='/nowhere/x.ckpt' is not a file; give 'last' or the path of a .ckpt file"
    )
    result = grass_train(tmp_path, "ckpt_every_n_steps=-1", check=False)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ckpt_every_n_steps=-1 must be >= 0 (0 turns checkpoints off)"
    )
    assert not (tmp_path / "model").exists()


def test_ckpt_every_n_steps_0_writes_no_checkpoint(tmp_path):
    grass_train(tmp_path, "ckpt_every_n_steps=0", "trainer.max_steps=1", "evaluate_before=false")
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_the_readme_example_killed_from_outside_after_its_third_checkpoint(tmp_path):
    command = [
        sys.executable,
        "-m",
        "lightning_grass.app.train",
        "model=scratch_llama",
        "data.num_train=512",
        "trainer.max_steps=40",
        "ckpt_every_n_steps=5",
    ]
    reference = tmp_path / "reference"
    subprocess.run([*command, f"paths.output_dir={reference}"], check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, f"paths.output_dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (last.exists() and saved_step(killed) >= 15):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 15 <= saved_step(killed) < 40
    subprocess.run(
        [*command, f"paths.output_dir={killed}", "ckpt_path=last"], check=True, capture_output=True, timeout=600
    )
    assert_same_run(killed, reference)
