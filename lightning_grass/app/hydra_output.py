"""Hydra and a run's output directory: nothing is written into it before the run holds it.

Hydra creates ``hydra.run.dir`` and writes its record of the job (``.hydra/config.yaml``, ``hydra.yaml``,
``overrides.yaml``) before it calls ``grass-train``'s task function, that is, before the run has claimed the
directory (:func:`~lightning_grass.app.run_directory.claim_output_dir`). A run that is then refused, because
another run holds the directory or has left its results there, would already have replaced that run's record.
So ``conf/train.yaml`` turns Hydra's own record off (``hydra.output_subdir: null``) and:

- :class:`OutputDirCheck`, a Hydra callback, refuses an unusable directory (a file, no permission, a read-only
  filesystem) in one line before Hydra touches it;
- :func:`write_hydra_record` writes the same three files once the run holds the directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from lightning_grass.app.input_errors import report_input_errors
from lightning_grass.app.run_directory import check_output_dir
from lightning_grass.persistence.atomic_files import write_text_atomically

#: Where the record goes inside the output directory, as Hydra's default ``hydra.output_subdir``.
RECORD_DIR = ".hydra"


class OutputDirCheck(Callback):
    """Refuse an output directory that cannot be used, with ``error: <message>`` and exit status 2.

    Runs before Hydra creates the directory: ``hydra.run.dir`` for one run, ``hydra.sweep.dir`` for a sweep
    (whose jobs' folders go inside it).
    """

    @override
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with report_input_errors():
            check_output_dir(config.hydra.run.dir)

    @override
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with report_input_errors():
            check_output_dir(config.hydra.sweep.dir)


def write_hydra_record(cfg: DictConfig, output_dir: Path) -> None:
    """Write Hydra's record of this job into ``<output_dir>/.hydra``, as Hydra itself would have.

    Call it once the run holds ``output_dir``. Outside a Hydra app (``run`` called directly) there is no
    record to write; under data parallelism global rank 0 writes it.

    Args:
        cfg: The task's config, as the task function received it.
        output_dir: The run's directory.
    """
    if not HydraConfig.initialized() or getattr(rank_zero_only, "rank", 0) != 0:
        return
    hydra_cfg = HydraConfig.get()
    record = output_dir / RECORD_DIR
    record.mkdir(exist_ok=True)
    write_text_atomically(record / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomically(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text_atomically(record / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
