"""bench_real_memory.py: every configuration measured on a tiny tied Llama, and estimate_memory beside each peak."""

import dataclasses

import bench_real_memory
import pytest
import torch
from bench_real_memory import SMOKE_BATCH, SMOKE_CONFIG
from offload_runs import CausalLM, ModelShape
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_grass import estimate_memory


def table(text, heading):
    """The rows of the table under ``heading``, by run name, as lists of cells."""
    lines = text.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    output = tmp_path_factory.mktemp("real") / "memory.md"
    assert bench_real_memory.main(["--smoke", "--output", str(output)]) == 0, "every configuration passed"
    return output.read_text()


# The smoke run starts 7 processes (about 60 s on 2 cores), so its two tests are in the slow set; the default run
# keeps the loader's test below, and tests/experiments/test_offload_runs.py covers the runner they share.
@pytest.mark.slow
def test_the_smoke_run_measures_every_configuration(smoke_report):
    names = [run.name for run in bench_real_memory.runs()]
    measured = table(smoke_report, "Memory and speed")
    assert list(measured) == names, "one row per configuration, in order"
    for name, cells in measured.items():
        assert cells[2] == "passed", (name, cells[2])
        before, peak, grown = (float(cell) for cell in cells[3:6])
        assert 0 < before <= peak and grown == pytest.approx(peak - before, abs=0.11), name
        assert float(cells[8]) >= 0, "a median step time"
        assert float(cells[11]) > 0, "optimizer state was counted"
    assert measured["full"][6] == measured["full"][9] == "1.000"
    assert measured["lisa_resident"][7] == measured["lisa_resident"][10] == "1.000"
    assert measured["grass_host"][12].endswith(" in RAM") and measured["grass_disk"][12].endswith(" on disk")
    assert "Wall time: " in smoke_report and " s in all" in smoke_report, "the header says the benchmark ended"
    assert "Command: `python experiments/bench_real_memory.py --smoke" in smoke_report


@pytest.mark.slow
def test_the_estimate_column_is_estimate_memory_of_the_model(smoke_report):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOKE_CONFIG))
    estimated = table(smoke_report, "estimate_memory beside the measured peak")
    runs = bench_real_memory.runs()
    assert list(estimated) == [run.name for run in runs]
    # The largest block tensor, 64 x 176 (or 176 x 64) in fp32: two moments and the for-loop AdamW's two
    # temporaries (16 bytes an element) and a step counter; the budget holds two.
    two_tensors = 2 * (64 * 176 * 16 + 4)
    budgets = {"grass_host_budget": two_tensors, "grass_disk_budget": two_tensors}
    # The tied embedding, 256 x 64, in 4 chunks of 64 rows: the budget is twice one chunk while stepped.
    budgets["grass_disk_chunked"] = 2 * (64 * 64 * 16 + 4)
    for run in runs:
        cells = estimated[run.name]
        budget = budgets.get(run.name)
        if budget is None:
            assert cells[1] == "none", run.name
        else:
            assert cells[1].startswith(f"{budget} ("), (run.name, cells[1])
        direct = estimate_memory(
            model,
            n_active=SMOKE_CONFIG["num_hidden_layers"] if run.name == "full" else 2,
            precision="32-true",
            offload=run.offload,
            max_resident_bytes=budget,
            offload_always_on=run.offload_always_on,
            foreach=False,
        )
        assert int(cells[8]) == direct.total, run.name
        assert float(cells[7]) == pytest.approx(direct.total / 2**20, abs=0.051)


def test_a_run_reads_the_directory_s_weights_into_a_model_of_its_shape(tmp_path):
    torch.manual_seed(1)
    saved = LlamaForCausalLM(LlamaConfig(**SMOKE_CONFIG))
    saved.save_pretrained(tmp_path)
    shape = ModelShape.from_pretrained(tmp_path, **SMOKE_BATCH)
    assert (shape.layers, shape.kv_heads, shape.tied_embeddings) == (4, 2, True)
    assert shape.parameters() == sum(p.numel() for p in saved.parameters())

    loaded = CausalLM(shape, torch.float32, "cpu").model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight, "the head is still tied"
    expected = dict(saved.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, expected[name]), name

    with pytest.raises(ValueError, match=r"kv_heads=4 but the directory's is 2; build the shape with"):
        CausalLM(dataclasses.replace(shape, kv_heads=4), torch.float32, "cpu")
