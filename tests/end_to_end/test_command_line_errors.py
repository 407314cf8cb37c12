"""Bad input on the command line: `error: <message>` on one line and exit status 2, the traceback on request."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_grass.app import cli
from lightning_grass.app.lm import CausalLMModule

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


@pytest.mark.slow  # 12 s: test_data_alpaca names the line of a malformed file in process, with the same message
def test_a_malformed_data_file_names_its_line(tmp_path):
    data = tmp_path / "data.jsonl"
    lines = ['{"instruction": "1 + 1?", "output": "#### 2"}'] * 2 + ['{"instruction": "2 + 2?", "output": #### 4}']
    data.write_text("\n".join(lines) + "\n")
    result = grass_train(tmp_path, "data=alpaca_json", f"data.task={data}")
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: {data}, line 3: invalid JSON: ") and "Traceback" not in result.stderr


def grass_cli(tmp_path, *arguments):
    environment = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LIGHTNING_GRASS_TRACEBACK")}
    command = [
        str(Path(sys.executable).parent / "grass-cli"),
        "fit",
        "--config",
        str(REPO / "conf" / "cli" / "grass.yaml"),
    ]
    return subprocess.run(
        [*command, *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment
    )


@pytest.mark.slow  # 10 s: test_lm refuses a missing pretrained_path in process, with the same message
def test_a_missing_model_directory(tmp_path):
    result = grass_train(tmp_path, "model=local", f"model.pretrained_path={tmp_path / 'nothing'}")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: pretrained_path='{tmp_path / 'nothing'}' does not exist: point it at a directory written by "
        "save_pretrained (models are never downloaded)"
    )


@pytest.mark.slow  # 12 s: test_lm refuses every bad learning rate in process
def test_a_learning_rate_that_is_not_a_number_above_zero(tmp_path):
    result = grass_train(tmp_path, "model.lr=nan")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "error: lr=nan must be a finite number > 0, such as 2e-5"
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # 13 s: test_lm names truncated weights in process
def test_truncated_weights_are_named(tmp_path, tiny_pretrained_dir):
    model = shutil.copytree(tiny_pretrained_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = grass_train(tmp_path, "model=local", f"model.pretrained_path={model}")
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: {weights}: unreadable safetensors weights (Error while deserializing header: ")
    assert last.endswith("the file is truncated or not a safetensors file: save the model again")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "variable",
    [
        # slow (13 s and 12 s): test_input_errors reads both variables in process, on the same code path
        pytest.param("HYDRA_FULL_ERROR", marks=pytest.mark.slow),
        pytest.param("LIGHTNING_GRASS_TRACEBACK", marks=pytest.mark.slow),
    ],
)
def test_the_traceback_when_asked_for(tmp_path, variable):
    result = grass_train(tmp_path, "sampler.n_active=9", **{variable: "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "SettingValueError: n_active=9 must be between 1 and the number of layers (2)" in result.stderr


def test_grass_cli_reports_bad_input_in_one_line(tmp_path, tiny_pretrained_dir):
    result = grass_cli(tmp_path, f"--model.pretrained_path={tiny_pretrained_dir}", "--data.max_length=0")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "error: max_length=0 must be an integer >= 1"
    assert "Traceback" not in result.stderr


def test_grass_cli_names_a_strategy_setting_that_jsonargparse_tried_as_a_union(tmp_path, tiny_pretrained_dir):
    result = grass_cli(
        tmp_path,
        f"--model.pretrained_path={tiny_pretrained_dir}",
        "--trainer.strategy.init_args.max_resident_bytes=12 parsecs",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "error: max_resident_bytes='12 parsecs' is not a byte size; write a number with one of the units "
        "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, for example '512MiB'"
    )
    assert "Traceback" not in result.stderr and "Union" not in result.stderr


# The two below run grass-cli's entry point in this process: the same code as the console script, without the
# 15 s of a fresh interpreter's imports.
def test_grass_cli_reports_a_malformed_command_line_in_one_line_in_jsonargparses_words(capsys, monkeypatch):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(REPO / "conf" / "cli" / "grass.yaml"), "--model.lr=abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: Parser key \"model.lr\": Expected a <class 'float'>. Got value: abc\n"


def test_grass_cli_reports_a_setting_lightnings_trainer_refuses(capsys, monkeypatch, tiny_pretrained_dir):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    arguments = [f"--model.pretrained_path={tiny_pretrained_dir}", "--trainer.max_steps=-5"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(REPO / "conf" / "cli" / "grass.yaml"), *arguments])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: trainer: `max_steps` must be a non-negative integer or -1 (infinite steps). You passed in -5."
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=-5", "error: trainer: `max_steps` must be a non-negative integer or -1"),
        pytest.param(  # slow (11 s): test_input_errors refuses it in process
            "trainer.precision=bogus", "error: trainer: Precision 'bogus' is invalid.", marks=pytest.mark.slow
        ),
    ],
)
def test_a_setting_lightnings_trainer_refuses_is_one_line_naming_the_trainer(tmp_path, override, message):
    result = grass_train(tmp_path, override, "evaluate_before=false")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ("-1", "error: seed_everything=-1 must be an integer in [0, 4294967295]"),
        (str(10**21), f"error: seed_everything={10**21} must be an integer in [0, 4294967295]"),
        (
            "abc",
            'error: Parser key "seed_everything": Does not validate against any of the Union subtypes Subtypes: '
            "[<class 'bool'>, <class 'int'>] Errors: - Expected a <class 'bool'> - Expected a <class 'int'> Given "
            "value type: <class 'str'> Given value: abc",
        ),
    ],
    ids=["negative", "above 2**32 - 1", "not a number"],
)
def test_grass_cli_refuses_a_seed_out_of_range_in_one_line(capsys, monkeypatch, seed, message):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(REPO / "conf" / "cli" / "grass.yaml"), f"--seed_everything={seed}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_grass_cli_names_a_truncated_ckpt_path_in_one_line(tmp_path, capsys, monkeypatch, tiny_pretrained_dir):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    torch.save({"state_dict": {"w": torch.zeros(20_000)}, "pytorch-lightning_version": "2.6.0"}, tmp_path / "x.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((tmp_path / "x.ckpt").read_bytes()[:40_000])  # cut where torch's reader says EINVAL
    arguments = [f"--model.pretrained_path={tiny_pretrained_dir}", f"--ckpt_path={truncated}"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(REPO / "conf" / "cli" / "grass.yaml"), *arguments])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: checkpoint {truncated} is truncated (40,000 bytes, the end of the archive is missing)"
    )


def test_grass_cli_refuses_a_trainer_setting_lightning_accepts_but_cannot_train_with(
    capsys, monkeypatch, tiny_pretrained_dir
):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    arguments = [f"--model.pretrained_path={tiny_pretrained_dir}", "--trainer.accumulate_grad_batches=0"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(REPO / "conf" / "cli" / "grass.yaml"), *arguments])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "error: trainer.accumulate_grad_batches=0 must be an integer >= 1"


def test_grass_cli_refuses_a_weights_only_ckpt_path_in_one_line(tmp_path, capsys, monkeypatch, tiny_pretrained_dir):
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    weights = CausalLMModule(pretrained_path=tiny_pretrained_dir).state_dict()
    torch.save({"state_dict": weights, "pytorch-lightning_version": "2.6.0", "global_step": 3}, tmp_path / "w.ckpt")
    arguments = [f"--model.pretrained_path={tiny_pretrained_dir}", f"--ckpt_path={tmp_path / 'w.ckpt'}"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", str(REPO / "conf" / "cli" / "grass.yaml"), *arguments])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: checkpoint {tmp_path / 'w.ckpt'} holds the model's weights only (it was saved ")
