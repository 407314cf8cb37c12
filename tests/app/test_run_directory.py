"""One run, one output directory: a live run's lock refuses a second one, a dead run's leftover does not."""

import errno
import os
import subprocess
import sys
import tempfile

import pytest

from lightning_grass.app.run_directory import LOCK_FILE, check_output_dir, claim_output_dir
from lightning_grass.errors import SettingValueError, StorageError


def test_a_second_claim_is_refused_while_the_first_is_held_and_allowed_after(tmp_path):
    with claim_output_dir(tmp_path, "checkpoints", resuming=False):
        with pytest.raises(SettingValueError) as raised, claim_output_dir(tmp_path, "checkpoints", resuming=False):
            pass
        assert str(raised.value).startswith(f"paths.output_dir={tmp_path} is in use by a running grass-train (pid ")
    with claim_output_dir(tmp_path, "checkpoints", resuming=False):
        pass


def test_the_lock_file_of_a_killed_run_holds_nothing(tmp_path):
    script = (
        "import os, signal, sys\n"
        "from lightning_grass.app.run_directory import claim_output_dir\n"
        "with claim_output_dir(sys.argv[1], 'checkpoints', resuming=False):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert child.returncode == -9
    assert (tmp_path / LOCK_FILE).read_text().startswith("pid ")
    with claim_output_dir(tmp_path, "checkpoints", resuming=False):
        pass


@pytest.mark.slow  # 8 s: the in-process refusal above shows the lock; this shows it across processes
def test_a_live_process_elsewhere_holds_the_directory(tmp_path):
    script = (
        "import sys, time\n"
        "from lightning_grass.app.run_directory import claim_output_dir\n"
        "with claim_output_dir(sys.argv[1], 'checkpoints', resuming=False):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        in_use = f"is in use by a running grass-train \\(pid {holder.pid} on "
        with pytest.raises(SettingValueError, match=in_use), claim_output_dir(tmp_path, "checkpoints", resuming=True):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_fresh_run_refuses_a_directory_with_a_checkpoint_and_a_resume_takes_it(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"seed 0")
    with pytest.raises(SettingValueError) as raised, claim_output_dir(tmp_path, "checkpoints", resuming=False):
        pass
    assert str(raised.value) == (
        f"paths.output_dir={tmp_path} already holds a checkpoint of an earlier run (checkpoints/last.ckpt); resume "
        "that run with ckpt_path=last, or start a fresh one with another paths.output_dir"
    )
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"seed 0", "nothing already saved is touched"
    with claim_output_dir(tmp_path, "checkpoints", resuming=True):
        pass


def finished_run(directory):
    directory.mkdir(exist_ok=True)
    (directory / "metrics.json").write_text('{"seed": 1}')
    (directory / "model").mkdir()
    (directory / "model" / "model.safetensors").write_bytes(b"weights of seed 1")


@pytest.mark.parametrize("resuming", [False, True], ids=["fresh", "ckpt_path=last without a checkpoint"])
def test_a_run_from_step_0_refuses_a_finished_runs_results(tmp_path, resuming):
    finished_run(tmp_path)
    with pytest.raises(SettingValueError) as raised, claim_output_dir(tmp_path, "checkpoints", resuming=resuming):
        pass
    assert str(raised.value) == (
        f"paths.output_dir={tmp_path} already holds the results of an earlier run (metrics.json, model/) and no "
        "checkpoint to resume it from; give this run another paths.output_dir (or move those results away first)"
    )
    assert (tmp_path / "metrics.json").read_text() == '{"seed": 1}', "nothing already saved is touched"
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights of seed 1"


def test_deleting_the_checkpoints_of_a_finished_run_does_not_open_it_to_a_fresh_run(tmp_path):
    finished_run(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SettingValueError) as raised, claim_output_dir(tmp_path, "checkpoints", resuming=False):
        pass
    assert "already holds the results of an earlier run (metrics.json, model/)" in str(raised.value)


def test_a_resume_from_the_finished_runs_own_checkpoint_continues_it(tmp_path):
    finished_run(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"step 6")
    with claim_output_dir(tmp_path, "checkpoints", resuming=True):
        pass


def test_an_output_dir_that_is_a_file_is_refused_and_left_alone(tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(StorageError) as raised:
        check_output_dir(tmp_path / "out")
    assert str(raised.value) == f"paths.output_dir={tmp_path / 'out'} is a file, not a directory; give a directory"
    assert (tmp_path / "out").read_text() == "notes"


def test_an_output_dir_below_a_file_cannot_be_created(tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(StorageError) as raised:
        check_output_dir(tmp_path / "out" / "run")
    assert str(raised.value) == (
        f"paths.output_dir={tmp_path / 'out' / 'run'} cannot be written (Not a directory); give a directory this "
        "user can write, on a filesystem with free space"
    )


# A read-only filesystem and a directory without write permission are simulated: permissions do not stop root
# (which runs CI here), and mounting a filesystem needs privileges a test does not have.
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only filesystem", "no permission"])
def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(StorageError) as raised:
        check_output_dir(tmp_path)
    assert str(raised.value) == (
        f"paths.output_dir={tmp_path} cannot be written ({os.strerror(code)}); give a directory this user can write, "
        "on a filesystem with free space"
    )
