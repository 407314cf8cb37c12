"""grass-train survives interruptions: SIGKILL and SIGTERM mid-epoch, then ``ckpt_path=last``, bit-exactly."""

import json
import os
import shutil
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


def grass_train(output_dir, *overrides, check=True, entry=("-m", "lightning_grass.app.train")):
    command = [sys.executable, *entry, *RUN, f"paths.output_dir={output_dir}", *overrides]
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


# The tests that compare with the uninterrupted run go to one pytest-xdist worker (--dist loadgroup): it runs once.
with_reference = pytest.mark.xdist_group("grass_train_checkpoints.reference")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    grass_train(output_dir)
    assert saved_step(output_dir) == 12, "the end of training writes last.ckpt too"
    return output_dir


@with_reference
@pytest.mark.slow  # 25 s: the SIGINT and full-disk tests resume mid-epoch with ckpt_path=last in the default run
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


@with_reference
@pytest.mark.slow  # 20 s: test_preemption saves on SIGTERM in process; the SIGINT and evaluation tests exit here
def test_sigterm_saves_a_checkpoint_exits_with_143_and_the_run_resumes_bit_exactly(tmp_path, reference):
    stopped = grass_train(tmp_path, *signal_at(5, "SIGTERM"), check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert saved_step(tmp_path) == 5, "saved at the end of the step SIGTERM arrived in, not at the last multiple of 3"
    assert f"stopped by SIGTERM after step 5; resume with ckpt_path=last paths.output_dir={tmp_path}" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    assert not (tmp_path / "metrics.json").exists()

    grass_train(tmp_path, "ckpt_path=last")
    assert_same_run(tmp_path, reference)


@with_reference
@pytest.mark.slow  # 23 s: the SIGTERM tests run the same handler; the exit status is 128 + the signal's number
def test_sigint_does_what_sigterm_does_and_exits_with_130(tmp_path, reference):
    stopped = grass_train(tmp_path, *signal_at(5, "SIGINT"), check=False)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert saved_step(tmp_path) == 5
    assert f"stopped by SIGINT after step 5; resume with ckpt_path=last paths.output_dir={tmp_path}" in stopped.stdout
    assert "Traceback" not in stopped.stderr

    resumed = grass_train(tmp_path, "ckpt_path=last")
    assert "resuming from the checkpoint of step 5" in resumed.stdout
    changed = sorted(line.split("=")[0] for line in resumed.stdout.splitlines() if line.startswith("resuming with "))
    assert changed == [f"resuming with callbacks.stop.{name}" for name in ("_target_", "signal", "step")], (
        "only the callback that sent the signal is gone"
    )
    assert_same_run(tmp_path, reference)


@with_reference
def test_a_signal_in_the_final_evaluation_leaves_the_checkpoint_and_the_resume_completes_the_outputs(
    tmp_path, reference
):
    evaluation = (str(HERE / "signal_in_evaluation.py"), "SIGTERM")
    stopped = grass_train(tmp_path, check=False, entry=evaluation)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert (
        f"stopped by SIGTERM during the final evaluation; resume with ckpt_path=last paths.output_dir={tmp_path}"
        in stopped.stdout
    )
    assert saved_step(tmp_path) == 12, "the end of training was saved before the evaluation began"
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model").exists()

    resumed = grass_train(tmp_path, "ckpt_path=last", "save_plots=false")
    assert "resuming with save_plots=False; the run started with save_plots=True" in resumed.stdout
    assert_same_run(tmp_path, reference)  # train/loss included: it comes from the checkpoint


@with_reference
@pytest.mark.slow  # 11 s: test_run_directory refuses the used folder in process and checks nothing is touched
def test_a_fresh_run_into_a_used_output_dir_is_refused_and_leaves_it_intact(tmp_path, reference):
    before = {p: p.read_bytes() for p in [reference / "checkpoints" / "last.ckpt", reference / "metrics.json"]}
    result = grass_train(reference, "seed=1", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: paths.output_dir={reference} already holds a checkpoint of an earlier run (checkpoints/last.ckpt); "
        "resume that run with ckpt_path=last, or start a fresh one with another paths.output_dir"
    )
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["last.ckpt"]


@pytest.mark.slow  # 18 s: test_run_directory refuses a held directory in process
def test_a_second_process_on_a_live_runs_output_dir_is_refused(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from lightning_grass.app.run_directory import claim_output_dir\n"
            "with claim_output_dir(sys.argv[1], 'checkpoints', resuming=False):\n"
            "    print('held', flush=True); time.sleep(120)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        result = grass_train(tmp_path, "ckpt_path=last", check=False)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: paths.output_dir={tmp_path} is in use by a running grass-train (pid {holder.pid} on ")
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [  # slow (10 s each): test_atomic_checkpoint_io reads both in process; the truncated case below runs here
        pytest.param(b"", "is empty (0 bytes): the save that wrote it was cut short", marks=pytest.mark.slow),
        pytest.param(
            b"not a checkpoint\n", "is not a checkpoint (17 bytes, not a torch.save archive)", marks=pytest.mark.slow
        ),
    ],
)
def test_an_unreadable_last_ckpt_stops_the_resume_in_one_line_naming_it(tmp_path, content, problem):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(content)
    result = grass_train(tmp_path, "ckpt_path=last", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: checkpoint {last} {problem}"
    assert last.read_bytes() == content


@with_reference
@pytest.mark.slow  # 12 s each: test_atomic_checkpoint_io names checkpoints cut at six points in process
@pytest.mark.parametrize("size", [100_000, 60_000])  # at 60 KB torch's reader fails with EINVAL
def test_a_truncated_checkpoint_stops_the_resume_naming_it(tmp_path, reference, size):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes((reference / "checkpoints" / "last.ckpt").read_bytes()[:size])
    result = grass_train(tmp_path, "ckpt_path=last", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {last} is truncated ({size:,} bytes, the end of the archive is missing)"
    )


@with_reference
@pytest.mark.slow  # 10 s: test_checkpoints refuses a weights-only checkpoint in process, with the same message
def test_a_weights_only_checkpoint_stops_the_resume_in_one_line(tmp_path, reference):
    checkpoint = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=False)
    for key in ("optimizer_states", "lr_schedulers", "callbacks"):  # what Lightning leaves out with weights_only
        del checkpoint[key]
    torch.save(checkpoint, tmp_path / "weights.ckpt")
    result = grass_train(tmp_path / "run", f"ckpt_path={tmp_path / 'weights.ckpt'}", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {tmp_path / 'weights.ckpt'} holds the model's weights only (it was saved with "
        "weights_only=True), without the optimizer and loop states that training resumes from; resume from a full "
        "checkpoint, such as the checkpoints/last.ckpt of a run"
    )


@pytest.mark.slow  # 10 s: test_checkpoints refuses the directory in process, with the same message
def test_a_last_ckpt_that_is_a_directory_stops_the_resume_in_one_line(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.mkdir(parents=True)
    result = grass_train(tmp_path, "ckpt_path=last", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: ckpt_path=last names {last}, which is a directory, not a checkpoint file; move it away (the run "
        "writes its checkpoints there) and run again"
    )
    assert not (tmp_path / "model").exists()


@with_reference
@pytest.mark.slow  # 12 s: test_checkpoints refuses the shuffled single-process position in process
def test_a_single_process_run_resumed_with_grass_ddp_is_refused_in_one_line(tmp_path, reference):
    last = reference / "checkpoints" / "last.ckpt"
    result = grass_train(tmp_path, f"ckpt_path={last}", "strategy=grass_ddp", check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {last} was written by a single-process strategy (such as strategy=grass), and "
        "GRASSDDPStrategy cannot load its position in the training data (it splits the data between processes); "
        "resume with the strategy the run started with, or start a new run with GRASSDDPStrategy"
    )


@with_reference
@pytest.mark.slow  # 15 s: test_checkpoints reports unreadable saved settings in process
def test_unreadable_saved_settings_do_not_block_the_resume(tmp_path, reference):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "resolved_config.yaml").write_bytes(b"seed: 0\nmodel: {lr: \xff\n")
    resumed = grass_train(tmp_path, "ckpt_path=last")
    assert "resuming from the checkpoint of step 12" in resumed.stdout
    assert (
        f"could not compare settings with {tmp_path / 'resolved_config.yaml'}: it is not UTF-8 text (byte 0xff at "
        "offset 20); resuming without the comparison"
    ) in resumed.stdout
    assert (tmp_path / "metrics.json").is_file()


@with_reference
@pytest.mark.slow  # 10 s: test_atomic_checkpoint_io checks the shapes in process
def test_a_checkpoint_of_another_model_shape_is_refused_naming_a_tensor(tmp_path, reference):
    result = grass_train(
        tmp_path, f"ckpt_path={reference / 'checkpoints' / 'last.ckpt'}", "model.config.hidden_size=16", check=False
    )
    assert result.returncode == 2
    assert "in the checkpoint and" in result.stderr.strip().splitlines()[-1]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: checkpoint {reference / 'checkpoints' / 'last.ckpt'} holds another model shape: model.")
    )


def test_a_run_that_diverges_writes_its_outputs_and_exits_3(tmp_path):
    result = grass_train(tmp_path, "model.lr=1e30", "ckpt_every_n_steps=0", "trainer.max_steps=10", check=False)
    assert result.returncode == 3, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 10
    skipped = metrics["skipped_non_finite_steps"]
    assert len(skipped) > 5 and skipped == sorted(skipped), "more than half: from step 4 or 5 on"
    assert f"skipped steps     {len(skipped)} of 10 for non-finite gradients" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (  # the first reason train._divergence finds
        f"error: training diverged: the last training loss is nan; outputs written to {tmp_path}"
    )
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 600 KiB tmpfs: room for one 369 KB checkpoint beside the run's small files, not for a second copy."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (mount said: {mounted.stderr.decode().strip()})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@with_reference
def test_a_disk_that_fills_after_the_first_checkpoint_keeps_it_and_the_run_resumes_exactly(
    small_filesystem, tmp_path, reference, monkeypatch
):
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_temp))
    output_dir = small_filesystem / "run"
    full = grass_train(output_dir, check=False)
    assert full.returncode == 2, full.stderr[-3000:]
    last = output_dir / "checkpoints" / "last.ckpt"
    assert full.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {last}: No space left on device (")
    assert saved_step(output_dir) == 3, "the step-3 checkpoint survives the failed step-6 save"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"], "no temporary file is left behind"
    assert list(system_temp.iterdir()) == [], "nothing is staged in the system temp folder"

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_filesystem)], check=True)
    resumed = grass_train(output_dir, "ckpt_path=last")
    assert "resuming from the checkpoint of step 3" in resumed.stdout
    assert_same_run(output_dir, reference)


def test_bad_checkpoint_settings_stop_before_any_work(tmp_path):
    result = grass_train(tmp_path, "ckpt_path=/nowhere/x.ckpt", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ckpt_path='/nowhere/x.ckpt' is not a file; give 'last' or the path of a .ckpt file"
    )
    assert not (tmp_path / "model").exists()  # every other checkpoint setting: tests/app/test_checkpoints.py


def test_ckpt_every_n_steps_0_writes_no_checkpoint(tmp_path):
    grass_train(tmp_path, "ckpt_every_n_steps=0", "trainer.max_steps=3", "evaluate_before=false")
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
