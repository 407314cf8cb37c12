"""One run, one output directory: a live run's lock refuses a second one, a dead run's leftover does not."""

import subprocess
import sys

import pytest

from lightning_grass.app.run_directory import LOCK_FILE, claim_output_dir
from lightning_grass.errors import SettingValueError


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
        f"that run with ckpt_path=last, or start a fresh one with another paths.output_dir (or delete "
        f"{tmp_path / 'checkpoints'})"
    )
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"seed 0", "nothing already saved is touched"
    with claim_output_dir(tmp_path, "checkpoints", resuming=True):
        pass
