"""One line on what this machine offers the GPU check: CUDA, NCCL and host registration, each tried, not assumed.

``experiments/gpu_check.sh`` prints this line before anything else runs, so that a check whose later parts fail
says first whether the machine could have run them:

- CUDA: whether torch sees a device (its name, torch's CUDA version), or why not;
- NCCL: whether torch has it (``torch.distributed.is_nccl_available()``, ``torch.cuda.nccl.version()``) and, on
  CUDA, whether a one-rank NCCL group sums a tensor on the device, tried in a child process with a timeout so that
  a hang costs the timeout, not the line;
- host registration: whether page-locking memory that torch did not allocate works here, from
  ``lightning_grass.offload.host_tier.host_registration_works`` where this checkout has it.

    python experiments/probe_device.py                 # the line; exit status 0
    python experiments/probe_device.py --require-cuda  # the same; exit status 3 when torch sees no CUDA device
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

#: Seconds the one-rank NCCL trial may take, its child process's start-up (importing torch) included.
NCCL_TRIAL_TIMEOUT_S = 45.0


def cuda_phrase() -> str:
    """Whether torch sees a CUDA device, and which, or why not."""
    if torch.cuda.is_available():
        return f"CUDA yes ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__})"
    if torch.version.cuda is None:
        return f"CUDA no (torch {torch.__version__} is built without CUDA)"
    return f"CUDA no (torch {torch.__version__}, built for CUDA {torch.version.cuda}, sees no device)"


def nccl_phrase() -> str:
    """Whether torch has NCCL, its version, and, on CUDA, whether a one-rank group sums a tensor."""
    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        return "NCCL no (this torch has none)"
    version = _nccl_version()
    if not torch.cuda.is_available():
        return f"NCCL built in ({version}), not tried (no CUDA)"
    command = [sys.executable, __file__, "--nccl-trial"]
    try:
        trial = subprocess.run(command, capture_output=True, text=True, timeout=NCCL_TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"NCCL {version} hung: a one-rank all-reduce did not finish in {NCCL_TRIAL_TIMEOUT_S:.0f} s"
    if trial.returncode == 0 and trial.stdout.strip() == "ok":
        return f"NCCL works ({version}, a one-rank all-reduce on the device)"
    errors = [line.strip() for line in trial.stderr.splitlines() if line.strip()]
    why = errors[-1] if errors else f"exit status {trial.returncode}, output {trial.stdout.strip()!r}"
    return f"NCCL {version} fails: {why}"


def host_registration_phrase() -> str:
    """Whether page-locking memory that torch did not allocate works on this machine's CUDA device."""
    if not torch.cuda.is_available():
        return "host registration: n/a (no CUDA)"
    try:
        from lightning_grass.offload.host_tier import host_registration_works
    except ImportError:
        return "host registration: not probed (this checkout has no probe)"
    try:
        works, reason = host_registration_works(torch.device("cuda", torch.cuda.current_device()))
    except Exception as error:  # the probe's own failure is a finding about this machine, not a reason to stop
        return f"host registration: the probe raised {type(error).__name__}: {error}"
    verdict = "works" if works else "fails"
    return f"host registration {verdict}" + (f" ({reason})" if reason else "")


def _nccl_version() -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as error:  # a build whose NCCL cannot even report its version says so in the line
        return f"version unknown: {type(error).__name__}"
    return ".".join(str(part) for part in version) if isinstance(version, tuple) else str(version)


def _nccl_trial() -> None:
    """Sum a tensor of ones on the device over a one-rank NCCL group; print ``ok`` if the sum is right."""
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as folder:
        store = torch.distributed.FileStore(str(Path(folder) / "store"), 1)
        torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1)
        try:
            ones = torch.ones(4, device="cuda")
            torch.distributed.all_reduce(ones)
            torch.cuda.synchronize()
            if not torch.equal(ones.cpu(), torch.ones(4)):
                raise RuntimeError(f"a one-rank all-reduce of four ones gave {ones.tolist()}")
        finally:
            torch.distributed.destroy_process_group()
    print("ok", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Print the line; return 3 if ``--require-cuda`` and torch sees no CUDA device, else 0."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--require-cuda", action="store_true", help="exit status 3 when torch sees no CUDA device")
    parser.add_argument("--nccl-trial", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_trial:
        _nccl_trial()
        return 0
    line = f"machine: {cuda_phrase()}; {nccl_phrase()}; {host_registration_phrase()}"
    print(" ".join(line.split()), flush=True)  # one line, whatever an error message held
    return 3 if args.require_cuda and not torch.cuda.is_available() else 0


if __name__ == "__main__":
    sys.exit(main())
