"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest
from tolerances import fp32_sum_rtol

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    # The fourth converts the real SmolLM2 file, which CI does not install: tests/app/test_gguf_base.py makes the
    # same call on a tiny GGUF file it writes, and on the real file in its slow test. The sixth, grass_fsdp on 16
    # GPUs, needs devices; tests/strategies/test_fsdp.py trains the same set-up (a plain LightningModule, no
    # configure_model) on 2 CPU processes.
    assert len(blocks) == 6 and "ensure_gguf_base(" in blocks[3] and 'strategy="grass_fsdp"' in blocks[5]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert type(namespace["trainer"].strategy).__name__ == "GRASSStrategy"
    exec(compile(blocks[1], str(README), "exec"), namespace)

    grass = namespace["grass"]
    assert grass.phase == "train"
    assert len(grass.active_layers) == 2
    # A float32 softmax over 8 layers: each entry within a few roundings, and a sum of 8 terms.
    assert grass.probabilities.sum().item() == pytest.approx(1.0, rel=fp32_sum_rtol(8, extra_operations=8))
    assert [record["step"] for record in grass.history] == [5, 15, 25, 35]
    trainer = namespace["trainer"]
    stats = trainer.strategy.offload_stats
    always_on = trainer.optimizers[0].unmanaged_state_bytes()
    assert 0 < stats["peak_resident_bytes"] <= 256 * 2**10 + always_on, "the budget held, streaming per tensor"
    assert stats["bytes_to_backing"] > 0
    assert (tmp_path / "importance.png").stat().st_size > 0
    assert (tmp_path / "selection.png").stat().st_size > 0

    exec(compile(blocks[2], str(README), "exec"), namespace)
    printed = re.search(r"print\(estimate\)  # (.*) \.\.\. (total .*)$", blocks[2], flags=re.MULTILINE)
    assert str(namespace["estimate"]).startswith(printed.group(1)), "the comment shows what it prints"
    assert str(namespace["estimate"]).endswith(printed.group(2))

    exec(compile(blocks[4], str(README), "exec"), namespace)  # the module-wise callback, built with the import above
    assert (namespace["grass"].config.unit, namespace["grass"].config.n_active) == ("module", 2)


def test_the_layout_section_matches_the_tree():
    text = README.read_text()
    layout = text[text.index("## Layout") :]
    mentioned = set(re.findall(r"\b\w+\.py\b", layout))
    repo = README.parent
    modules = {p for p in repo.glob("lightning_grass/**/*.py") if "app/data" not in p.as_posix()}
    assert {p.name for p in modules if p.name != "__init__.py"} <= mentioned
    assert mentioned <= {p.name for p in repo.rglob("*.py") if ".venv" not in p.parts}
    for folder in re.findall(r"^\s*([\w/]+/)\s", layout, flags=re.MULTILINE):
        assert any(path.is_dir() for path in repo.glob(f"**/{folder}") if ".venv" not in path.parts), folder
