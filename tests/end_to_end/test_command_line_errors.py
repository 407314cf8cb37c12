"""Bad input on the command line: `error: <message>` on one line and exit status 2, the traceback on request."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=scratch_llama", "trainer.max_steps=2", "logger=none", "callbacks=none"]


def grass_train(tmp_path, *overrides, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LIGHTNING_GRASS_TRACEBACK")}
    command = [sys.executable, "-m", "lightning_grass.app.train", *TINY, f"paths.output_dir={tmp_path / 'out'}"]
    return subprocess.run(
        [*command, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**environment, **env}
    )


def test_a_setting_the_model_cannot_take(tmp_path):
    result = grass_train(tmp_path, "sampler.n_active=9")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "error: n_active=9 must be between 1 and the number of layers (2)"
    assert "Traceback" not in result.stderr


def test_a_malformed_data_file_names_its_line(tmp_path):
    data = tmp_path / "data.jsonl"
    lines = ['{"instruction": "1 + 1?", "output": "#### 2"}'] * 2 + ['{"instruction": "2 + 2?", "output": #### 4}']
    data.write_text("\n".join(lines) + "\n")
    result = grass_train(tmp_path, "data=alpaca_json", f"data.task={data}")
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: {data}, line 3: invalid JSON: ") and "Traceback" not in result.stderr


def test_a_missing_model_directory(tmp_path):
    result = grass_train(tmp_path, "model=local", f"model.pretrained_path={tmp_path / 'nothing'}")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: pretrained_path='{tmp_path / 'nothing'}' has no config.json: point it at a directory written by "
        "save_pretrained (models are never downloaded)"
    )


@pytest.mark.parametrize("variable", ["HYDRA_FULL_ERROR", "LIGHTNING_GRASS_TRACEBACK"])
def test_the_traceback_when_asked_for(tmp_path, variable):
    result = grass_train(tmp_path, "sampler.n_active=9", **{variable: "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "SettingValueError: n_active=9 must be between 1 and the number of layers (2)" in result.stderr


def test_grass_cli_reports_bad_input_in_one_line(tmp_path, tiny_pretrained_dir):
    command = [
        str(Path(sys.executable).parent / "grass-cli"),
        "fit",
        "--config",
        str(REPO / "conf" / "cli" / "grass.yaml"),
    ]
    overrides = [f"--model.pretrained_path={tiny_pretrained_dir}", "--data.max_length=0"]
    result = subprocess.run([*command, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "error: max_length=0 must be >= 1"
    assert "Traceback" not in result.stderr
