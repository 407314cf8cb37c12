"""probe_device.py: one line on CUDA, NCCL and host registration, whichever of them this machine has."""

import subprocess
import sys
import types

import probe_device
import pytest
import torch


def test_on_this_cpu_the_line_says_what_is_missing(capsys):
    # This suite runs on CPU-only machines; the line must say so without failing.
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine has another line")
    assert probe_device.main([]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("machine: CUDA no (torch ")
    assert line.endswith("; host registration: n/a (no CUDA)")
    nccl = "NCCL no (this torch has none)" if not torch.distributed.is_nccl_available() else "not tried (no CUDA)"
    assert nccl in line
    assert probe_device.main(["--require-cuda"]) == 3, "the check needs a CUDA device"


@pytest.fixture
def cuda_machine(monkeypatch):
    """torch claims a CUDA device, as on the lent machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def host_tier_with(monkeypatch, **attributes):
    """The host tier module as some checkout has it: with or without ``host_registration_works``."""
    monkeypatch.setitem(sys.modules, "lightning_grass.offload.host_tier", types.SimpleNamespace(**attributes))


def test_host_registration_is_reported_if_this_checkout_can_probe_it(cuda_machine, monkeypatch):
    host_tier_with(monkeypatch)
    assert probe_device.host_registration_phrase() == "host registration: not probed (this checkout has no probe)"

    asked = []

    def works(device=None):
        asked.append(device)
        return True, "cudaHostRegister of 1 MiB"

    host_tier_with(monkeypatch, host_registration_works=works)
    assert probe_device.host_registration_phrase() == "host registration works (cudaHostRegister of 1 MiB)"
    assert asked == [torch.device("cuda", 0)]
    host_tier_with(monkeypatch, host_registration_works=lambda device=None: (False, "error 712"))
    assert probe_device.host_registration_phrase() == "host registration fails (error 712)"

    def raises(device=None):
        raise OSError("no driver")

    host_tier_with(monkeypatch, host_registration_works=raises)
    assert probe_device.host_registration_phrase() == "host registration: the probe raised OSError: no driver"


@pytest.mark.parametrize(
    ("trial", "phrase"),
    [
        (subprocess.CompletedProcess([], 0, "ok\n", ""), "NCCL works (2.21.5, a one-rank all-reduce on the device)"),
        (
            subprocess.CompletedProcess(
                [], 1, "", "Traceback ...\nDistBackendError: NCCL error: unhandled cuda error\n"
            ),
            "NCCL 2.21.5 fails: DistBackendError: NCCL error: unhandled cuda error",
        ),
        (
            subprocess.TimeoutExpired("trial", 45),
            "NCCL 2.21.5 hung: a one-rank all-reduce did not finish in 45 s",
        ),
    ],
)
def test_nccl_is_tried_in_a_child_process_on_cuda(cuda_machine, monkeypatch, trial, phrase):
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))

    def run(command, **settings):
        assert command[-1] == "--nccl-trial" and settings["timeout"] == probe_device.NCCL_TRIAL_TIMEOUT_S
        if isinstance(trial, Exception):
            raise trial
        return trial

    monkeypatch.setattr(probe_device.subprocess, "run", run)
    assert probe_device.nccl_phrase() == phrase


def test_the_line_is_one_line_whatever_a_phrase_holds(monkeypatch, capsys):
    monkeypatch.setattr(
        probe_device, "host_registration_phrase", lambda: "host registration fails (line one\nline two)"
    )
    probe_device.main([])
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith("host registration fails (line one line two)")
