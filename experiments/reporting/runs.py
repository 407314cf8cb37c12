"""Read the run directories of a benchmark sweep: each job's ``metrics.json`` and resolved config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

#: Methods in the order the tables list them, with the names the tables use. A sampler run with
#: ``target_effective_layers`` set counts as its ``_calibrated`` variant in the paired statistics.
METHOD_LABELS: dict[str, str] = {
    "full": "Full fine-tuning",
    "lora": "LoRA",
    "lisa": "LISA",
    "grass_static": "GRASS*",
    "grass_static_calibrated": "GRASS* calibrated",
    "grass": "GRASS",
    "grass_calibrated": "GRASS calibrated",
}


@dataclass(frozen=True)
class Run:
    """One finished fine-tuning job of a sweep.

    Attributes:
        directory: The job's output directory.
        metrics: Its ``metrics.json``.
        config: Its ``resolved_config.yaml``, as plain containers.
    """

    directory: Path
    metrics: dict[str, Any]
    config: dict[str, Any]

    @property
    def method(self) -> str:
        """``full``, ``lora``, ``lisa``, ``grass_static`` or ``grass``."""
        return self.metrics["method"]

    @property
    def task(self) -> str:
        """The task the job trained on: ``arithmetic``, ``multiple_choice``, a JSONL path, or for a mixture of
        LLM-Adapters sets (``data.sets``) their names joined by ``+``."""
        sets = (self.config.get("data") or {}).get("sets")
        return "+".join(sets) if sets else str(self.metrics["task"])

    @property
    def seed(self) -> int:
        """The job's seed."""
        return int(self.metrics["seed"])


def load_runs(sweep_dir: str | Path) -> list[Run]:
    """Every fine-tuning job under ``sweep_dir``, sorted by task, method order and seed.

    Args:
        sweep_dir: A multirun directory of ``grass-train`` (one sub-directory per job).

    Returns:
        The runs.

    Raises:
        FileNotFoundError: If ``sweep_dir`` holds no finished fine-tuning job, or a job lacks its
            ``resolved_config.yaml``.
    """
    sweep_dir = Path(sweep_dir)
    runs = []
    for metrics_path in sorted(sweep_dir.glob("**/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("stage") != "finetune":
            continue
        config_path = metrics_path.parent / "resolved_config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: rerun the job with this version of grass-train")
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
        runs.append(Run(metrics_path.parent, metrics, config))
    if not runs:
        raise FileNotFoundError(f"no finished fine-tuning job (metrics.json with stage=finetune) under {sweep_dir}")
    order = list(METHOD_LABELS)
    return sorted(runs, key=lambda r: (r.task, order.index(r.method) if r.method in order else len(order), r.seed))
