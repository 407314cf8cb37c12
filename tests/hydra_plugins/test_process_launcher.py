"""`hydra/launcher=process`: one process per job, failures reported with the job's log."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hydra_plugins.lightning_grass_launcher.process_launcher import ProcessLauncher, _return_value

REPO = Path(__file__).resolve().parents[2]


def test_a_failing_job_fails_the_sweep_and_points_at_its_log(tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "lightning_grass.app.train",
        "-m",
        "hydra/launcher=process",
        "model=scratch_llama",
        "data.num_train=0",
        "logger=none",
        "callbacks=none",
        f"paths.output_dir={sweep}",
    ]
    # From outside the checkout: the launcher is found however the package was installed.
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "job #0 (model=scratch_llama data.num_train=0 logger=none" in result.stderr
    # Bad input ends a job with status 2 and one line in its log.
    assert f"exited with status 2; the end of {sweep / '0' / 'job.log'}:" in result.stderr
    assert "error: num_train=0 must be an integer >= 1" in (sweep / "0" / "job.log").read_text()
    assert "error: num_train=0 must be an integer >= 1" in result.stderr, "the end of the job's log is shown"


def test_return_value_is_the_optimized_metric_of_the_job(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"exact_match_after": 0.375}))
    assert _return_value(metrics, "exact_match_after") == 0.375
    assert _return_value(metrics, None) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"jobs": 0}, "hydra.launcher.jobs=0 must be >= 1"), ({"threads_per_job": 0}, "threads_per_job=0 must be >= 1")],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProcessLauncher(**kwargs)
