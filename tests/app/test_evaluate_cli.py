"""``grass-evaluate`` in process: a saved model scored on a suite, and one ``error:`` line for bad input."""

import errno
import json
import os
import shutil
import signal
import time

import pytest
from suite_files import write_suite

from lightning_grass.app import evaluate_cli, run_directory, suite_evaluation


def test_a_saved_model_is_scored_and_the_table_printed(tmp_path, tiny_pretrained_dir, capsys):
    root = write_suite(tmp_path / "LLM-Adapters", "arithmetic")
    out = tmp_path / "out"
    arguments = ["--model", str(tiny_pretrained_dir), "--suite", "arithmetic", "--data-root", str(root / "dataset")]
    evaluate_cli.main([*arguments, "--out", str(out), "--batch-size", "3", "--max-new-tokens", "4", "--limit", "2"])
    printed = capsys.readouterr().out
    assert "| Model | AddSub | MultiArith | SingleEq | GSM8K | AQuA | SVAMP | Avg. |\n" in printed
    assert f"written to {out}: arithmetic.md, arithmetic.json, arithmetic_predictions.jsonl" in printed
    summary = json.loads((out / "arithmetic.json").read_text())
    assert [s["total"] for s in summary["sets"].values()] == [2] * 6
    assert (summary["model"], summary["max_new_tokens"], summary["limit"]) == (str(tiny_pretrained_dir), 4, 2)
    assert len((out / "arithmetic_predictions.jsonl").read_text().splitlines()) == 12


def _error(tmp_path, capsys, *arguments):
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main([*arguments, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_an_unknown_suite(tmp_path, capsys, tiny_pretrained_dir):
    line = _error(tmp_path, capsys, "--model", str(tiny_pretrained_dir), "--suite", "maths", "--data-root", ".")
    assert line.startswith("error: argument --suite: invalid choice: 'maths'") and "arithmetic" in line


def test_a_missing_argument_and_a_bad_count(tmp_path, capsys):
    line = _error(tmp_path, capsys, "--suite", "arithmetic", "--data-root", ".")
    assert line == "error: the following arguments are required: --model (see grass-evaluate --help)"
    line = _error(tmp_path, capsys, "--model", ".", "--suite", "arithmetic", "--data-root", ".", "--batch-size", "0")
    assert line == "error: argument --batch-size: must be an integer >= 1, got '0' (see grass-evaluate --help)"


def test_a_missing_set(tmp_path, capsys, tiny_pretrained_dir):
    root = write_suite(tmp_path / "data", "commonsense", nested=False)
    shutil.rmtree(root / "winogrande")
    line = _error(
        tmp_path, capsys, "--model", str(tiny_pretrained_dir), "--suite", "commonsense", "--data-root", str(root)
    )
    assert line.startswith(f"error: the commonsense suite's sets ['winogrande'] are missing from {root}: ")


def test_a_malformed_record(tmp_path, capsys, tiny_pretrained_dir):
    root = write_suite(tmp_path / "data", "arithmetic", {"AQuA": [{"instruction": "Pick.", "answer": "F"}]})
    line = _error(
        tmp_path, capsys, "--model", str(tiny_pretrained_dir), "--suite", "arithmetic", "--data-root", str(root)
    )
    assert line == (
        f"error: {root / 'dataset' / 'AQuA' / 'test.json'}, record index 0: field 'answer' must be one of "
        "['A', 'B', 'C', 'D', 'E'], got 'F'"
    )


def test_a_missing_model_directory_or_tokenizer(tmp_path, capsys, tiny_pretrained_dir):
    root = str(write_suite(tmp_path / "data", "arithmetic"))
    line = _error(tmp_path, capsys, "--model", str(tmp_path / "nothing"), "--suite", "arithmetic", "--data-root", root)
    assert line == (
        f"error: --model '{tmp_path / 'nothing'}' is not a directory: give a directory written by save_pretrained"
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_pretrained_dir / name, bare / name)
    line = _error(tmp_path, capsys, "--model", str(bare), "--suite", "arithmetic", "--data-root", root)
    assert line.startswith(f"error: --model '{bare}' holds no tokenizer (none of ['tokenizer.json', ")


def test_a_seeded_sample_of_some_sets(tmp_path, tiny_pretrained_dir, capsys):
    records = {"boolq": [{"instruction": f"q{i}", "input": "", "output": "", "answer": "true"} for i in range(5)]}
    root = write_suite(tmp_path / "LLM-Adapters", "commonsense", records)
    out = tmp_path / "out"
    evaluate_cli.main(
        [
            *("--model", str(tiny_pretrained_dir), "--suite", "commonsense", "--data-root", str(root)),
            *("--out", str(out), "--sets", "openbookqa,boolq", "--sample", "2", "--sample-seed", "4"),
            *("--max-new-tokens", "2"),
        ]
    )
    assert "| Model | BoolQ | OBQA | Avg. |\n" in capsys.readouterr().out
    summary = json.loads((out / "commonsense.json").read_text())
    assert {name: s["total"] for name, s in summary["sets"].items()} == {"boolq": 2, "openbookqa": 2}
    assert (summary["sample"], summary["sample_seed"]) == (2, 4)


def test_an_unknown_set(tmp_path, capsys, tiny_pretrained_dir):
    root = write_suite(tmp_path / "LLM-Adapters", "commonsense")
    line = _error(
        tmp_path, capsys, "--model", str(tiny_pretrained_dir), "--suite", "commonsense", "--data-root", str(root),
        "--sets", "boolq,gsm8k",
    )  # fmt: skip
    assert line.startswith("error: sets=['boolq', 'gsm8k']: ['gsm8k'] are not sets of the commonsense suite")


def _never_load(model_dir, dtype):
    raise AssertionError("the model was loaded")


def test_an_out_that_is_a_file_is_refused_before_the_model_is_loaded(
    tmp_path, capsys, tiny_pretrained_dir, monkeypatch
):
    monkeypatch.setattr(evaluate_cli, "_load", _never_load)
    root = str(write_suite(tmp_path / "data", "arithmetic"))
    out = tmp_path / "results.md"
    out.write_text("an earlier table\n")
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main(
            ["--model", str(tiny_pretrained_dir), "--suite", "arithmetic", "--data-root", root, "--out", str(out)]
        )
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: --out={out} is a file, not a directory; give a directory\n")
    assert out.read_text() == "an earlier table\n"


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_an_out_that_cannot_be_written_is_refused_before_the_model_is_loaded(
    tmp_path, capsys, tiny_pretrained_dir, monkeypatch, code
):
    # Simulated (the tests run as root, which a read-only mode would not stop): every fsync fails as given.
    def refuse(descriptor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(evaluate_cli, "_load", _never_load)
    monkeypatch.setattr(run_directory.os, "fsync", refuse)
    root = str(write_suite(tmp_path / "data", "arithmetic"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main(
            ["--model", str(tiny_pretrained_dir), "--suite", "arithmetic", "--data-root", root, "--out", str(out)]
        )
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --out={out} cannot be written ({os.strerror(code)}); give a directory this user can write, on a "
        "filesystem with free space\n"
    )


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_scoring_is_one_line_and_its_exit_status(
    tmp_path, capsys, tiny_pretrained_dir, monkeypatch, name
):
    def signal_while_generating(*args):
        os.kill(os.getpid(), signal.Signals[name])
        time.sleep(5)  # the handler raises in this thread as soon as the signal arrives
        raise AssertionError("the signal did not stop the scoring")

    monkeypatch.setattr(suite_evaluation, "generate_answers", signal_while_generating)
    handlers = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)]
    root = str(write_suite(tmp_path / "data", "arithmetic"))
    out = tmp_path / "out"
    arguments = ["--model", str(tiny_pretrained_dir), "--suite", "arithmetic", "--data-root", root, "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        evaluate_cli.main(arguments)
    assert stop.value.code == 128 + signal.Signals[name]
    printed = capsys.readouterr().err  # after the progress bar of the model's loading
    assert printed.splitlines()[-1] == f"stopped by {name} before scoring ended; no results were written to {out}"
    assert "Traceback" not in printed
    assert list(out.iterdir()) == []
    assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)] == handlers, "they are restored"


def test_a_missing_or_damaged_set_outside_the_selection_is_not_read(tmp_path, capsys, tiny_pretrained_dir):
    root = write_suite(tmp_path / "LLM-Adapters", "commonsense")
    shutil.rmtree(root / "dataset" / "winogrande")
    (root / "dataset" / "piqa" / "test.json").write_bytes(b'[{"instruction": "cut sh')
    out = tmp_path / "out"
    evaluate_cli.main(
        [
            *("--model", str(tiny_pretrained_dir), "--suite", "commonsense", "--data-root", str(root)),
            *("--out", str(out), "--sets", "boolq,ARC-Easy", "--max-new-tokens", "2"),
        ]
    )
    assert "| Model | BoolQ | ARC-e | Avg. |\n" in capsys.readouterr().out
    assert list(json.loads((out / "commonsense.json").read_text())["sets"]) == ["boolq", "ARC-Easy"]
