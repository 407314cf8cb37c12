"""Bad data files and model folders through ``grass-train`` and ``grass-evaluate`` in process: exit status 2 and
one ``error:`` line that names the file, never a traceback. The messages themselves are checked in full by
test_data_alpaca, test_suites, test_data_datamodule and test_lm."""

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file, save_file
from suite_files import write_suite

from lightning_grass.app import evaluate_cli, train
from lightning_grass.app.data import TASKS

TINY = [
    "model=scratch_llama",
    "trainer.max_steps=2",
    "logger=none",
    "callbacks=none",
    "ckpt_every_n_steps=0",
    "save_plots=false",
    "evaluate_before=false",
]


@pytest.fixture
def grass_train(tmp_path, monkeypatch, capsys, hydra_logging_restored):
    """``grass-train`` in this process, expected to refuse its input: returns the ``stderr`` it printed."""
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)

    def run(*overrides: str) -> str:
        monkeypatch.setattr(sys, "argv", ["grass-train", *TINY, f"paths.output_dir={tmp_path / 'out'}", *overrides])
        with pytest.raises(SystemExit) as stopped:
            train.main()
        assert stopped.value.code == 2
        return capsys.readouterr().err

    return run


def _last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_a_data_file_nested_too_deeply(tmp_path, grass_train):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"instruction": "1 + 1?", "output": "#### 2"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    last = _last_line(grass_train("data=alpaca_json", f"data.task={data}"))
    assert last.startswith(f"error: {data}, line 2: JSON nested too deeply to read (")


def test_a_lone_surrogate_in_a_record(tmp_path, grass_train):
    data = tmp_path / "data.json"
    records = [{"instruction": f"{n} + 1?", "output": f"#### {n + 1}"} for n in range(3)]
    data.write_text(json.dumps([*records, {"instruction": "2 + 2?\ud800", "output": "#### 4"}]))
    last = _last_line(grass_train("data=alpaca_json", f"data.task={data}", "data.num_val=1"))
    assert last.startswith(f"error: {data}, record index 3: field 'instruction' holds the lone surrogate \\ud800 ")


def test_a_generated_task_too_large_for_memory(grass_train, monkeypatch):
    def generate(*args, **kwargs):
        raise AssertionError("the examples were being generated")  # rather than filling the memory

    monkeypatch.setitem(TASKS, "arithmetic", generate)
    last = _last_line(grass_train("data=arithmetic", "data.num_train=100000000000"))
    assert last.startswith("error: num_train=100000000000 asks for more examples than a generated task holds in memory")


@pytest.fixture
def prefixed_model(tmp_path, tiny_pretrained_dir):
    """The tiny saved model with every weight under a ``base_model.`` prefix, as a peft model saves them."""
    model = shutil.copytree(tiny_pretrained_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    save_file({f"base_model.{k}": v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return model


def test_a_model_whose_weights_match_no_parameter_is_not_trained(tmp_path, grass_train, prefixed_model):
    last = _last_line(grass_train("model=local", f"model.pretrained_path={prefixed_model}"))
    assert last.startswith(f"error: pretrained_path='{prefixed_model}': 21 of the 21 tensors of the LlamaForCausalLM ")
    assert not (tmp_path / "out" / "model").exists()


def test_a_model_whose_weights_match_no_parameter_is_not_scored(tmp_path, prefixed_model, capsys):
    root = write_suite(tmp_path / "data", "commonsense", nested=False)
    arguments = ["--model", str(prefixed_model), "--suite", "commonsense", "--data-root", str(root)]
    with pytest.raises(SystemExit) as stopped:
        evaluate_cli.main([*arguments, "--out", str(tmp_path / "scores")])
    assert stopped.value.code == 2
    last = _last_line(capsys.readouterr().err)
    assert last.startswith(f"error: pretrained_path='{prefixed_model}': 21 of the 21 tensors of the LlamaForCausalLM ")
    assert not (tmp_path / "scores" / "commonsense.json").exists()


def test_a_model_folder_without_a_tokenizer(tmp_path, grass_train, tiny_pretrained_dir):
    model = shutil.copytree(tiny_pretrained_dir, tmp_path / "model")
    (model / "tokenizer.json").unlink()
    last = _last_line(grass_train("model=local", f"model.pretrained_path={model}"))
    assert last.startswith(f"error: pretrained_path='{model}' has no tokenizer: it holds ['tokenizer_config.json'] of ")


@pytest.mark.parametrize(
    ("overrides", "name"), [(["model=local"], "model.pretrained_path"), (["data=alpaca_json"], "data.task")]
)
def test_a_setting_the_configs_leave_to_the_user(grass_train, overrides, name):
    assert _last_line(grass_train(*overrides)) == (
        f"error: {name} is not set: the configs chosen leave it to you ('???'); give it on the command line "
        f"({name}=...)"
    )
