"""``hydra/launcher=process``: run each multirun job of ``grass-train`` in a fresh Python process.

Hydra's basic launcher runs every job inside the sweeping process, so a job's peak resident memory includes
whatever earlier jobs left in the allocator, and the order of the sweep would decide the memory column of
a benchmark. This launcher starts ``python -m <module>`` for each job with the job's own overrides and
output directory, at most ``jobs`` at a time, and reads each job's return value back from its
``metrics.json``. A job's console output goes to ``job.log`` in its directory.
"""

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class ProcessLauncherConf:
    """Config of :class:`ProcessLauncher`."""

    _target_: str = "hydra_plugins.lightning_grass_launcher.process_launcher.ProcessLauncher"
    module: str = "lightning_grass.app.train"
    jobs: int = 1
    threads_per_job: Any = None


ConfigStore.instance().store(
    group="hydra/launcher", name="process", node=ProcessLauncherConf, provider="lightning_grass"
)


class ProcessLauncher(Launcher):
    """Launch each job as its own ``python -m <module>`` process.

    Args:
        module: The module whose Hydra app runs each job.
        jobs: How many jobs run at the same time, ``>= 1``.
        threads_per_job: CPU threads of each job (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``); ``None``
            leaves torch's default.

    Raises:
        ValueError: For ``jobs < 1`` or ``threads_per_job < 1``.
    """

    def __init__(
        self, module: str = "lightning_grass.app.train", jobs: int = 1, threads_per_job: int | None = None
    ) -> None:
        if jobs < 1:
            raise ValueError(f"hydra.launcher.jobs={jobs!r} must be >= 1")
        if threads_per_job is not None and threads_per_job < 1:
            raise ValueError(f"hydra.launcher.threads_per_job={threads_per_job!r} must be >= 1 or null")
        self.module = module
        self.jobs = jobs
        self.threads_per_job = threads_per_job
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the sweep's config and context; the task function runs in the child processes instead."""
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        """Run every job to completion, ``jobs`` at a time, and collect their results in job order.

        Args:
            job_overrides: One list of overrides per job.
            initial_job_idx: Number of the first job (sweepers that launch in batches pass a running count).

        Returns:
            One ``JobReturn`` per job; a job whose process failed has status ``FAILED``.
        """
        assert self.config is not None and self.hydra_context is not None, "setup() must run first"
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, each in its own process, {self.jobs} at a time")
        waiting = [(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        running: list[tuple[subprocess.Popen, JobReturn, float]] = []
        results: dict[int, JobReturn] = {}
        while waiting or running:
            while waiting and len(running) < self.jobs:
                idx, overrides = waiting.pop(0)
                running.append((*self._start(idx, overrides), time.perf_counter()))
            time.sleep(0.2)
            for entry in [entry for entry in running if entry[0].poll() is not None]:
                running.remove(entry)
                process, result, started = entry
                self._finish(process, result, time.perf_counter() - started)
                results[int(result.cfg.hydra.job.num)] = result
        return [results[idx] for idx in sorted(results)]

    def _start(self, idx: int, overrides: list[str]) -> tuple[subprocess.Popen, JobReturn]:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        job_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        command = [
            sys.executable,
            "-m",
            self.module,
            f"--config-name={sweep_config.hydra.job.config_name}",
            *overrides,
            f"hydra.run.dir={job_dir}",
            f"hydra.job.num={idx}",
            f"hydra.job.id={idx}",
        ]
        env = dict(os.environ)
        if self.threads_per_job is not None:
            env.update(OMP_NUM_THREADS=str(self.threads_per_job), MKL_NUM_THREADS=str(self.threads_per_job))
        with open(job_dir / "job.log", "w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        result = JobReturn(
            overrides=overrides,
            cfg=sweep_config,
            hydra_cfg=OmegaConf.create({"hydra": sweep_config.hydra}),
            working_dir=str(job_dir),
            task_name=sweep_config.hydra.job.name,
        )
        return process, result

    def _finish(self, process: subprocess.Popen, result: JobReturn, seconds: float) -> None:
        idx, job_dir = result.cfg.hydra.job.num, Path(result.working_dir)
        if process.returncode != 0:
            result.status = JobStatus.FAILED
            tail = "\n".join((job_dir / "job.log").read_text().splitlines()[-15:])
            result.return_value = RuntimeError(
                f"job #{idx} ({' '.join(result.overrides)}) exited with status {process.returncode}; "
                f"the end of {job_dir / 'job.log'}:\n{tail}"
            )
            log.error(f"\t#{idx} failed after {seconds:.0f} s: see {job_dir / 'job.log'}")
            return
        result.status = JobStatus.COMPLETED
        result.return_value = _return_value(job_dir / "metrics.json", result.cfg.get("optimized_metric"))
        log.info(f"\t#{idx} finished in {seconds:.0f} s")


def _return_value(metrics_path: Path, metric: str | None) -> float | None:
    """The job's ``optimized_metric`` from its ``metrics.json``, which is what the job's app returned."""
    if not metric:
        return None
    return float(json.loads(metrics_path.read_text())[metric])
