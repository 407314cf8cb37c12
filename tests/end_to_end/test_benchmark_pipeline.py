"""The benchmark end to end: the `bench_small` sweep on tiny settings, then the collector."""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = ["Full fine-tuning", "LoRA", "LISA", "GRASS*", "GRASS"]
# Every method, both tasks, one seed, a few steps of a scratch model: the preset's shape, in seconds per job.
TINY = [
    "experiment=bench_small",
    "model=scratch_llama",
    "data.num_train=32",
    "data.num_val=8",
    "data.batch_size=8",
    "trainer.max_steps=14",
    "model.eval_examples=4",
    "model.max_new_tokens=4",
    "seed=0",
    "hydra.launcher.jobs=2",
    "hydra.launcher.threads_per_job=1",
]


def test_sweep_and_collector_fill_every_row_and_draw_every_figure(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_grass.app.train", "-m", *TINY, f"paths.output_dir={sweep}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 10, "5 methods x 2 tasks x 1 seed"
    assert all((job / "job.log").is_file() and (job / "metrics.json").is_file() for job in jobs)

    out = tmp_path / "results"
    collect = [sys.executable, "experiments/collect_results.py", str(sweep), "--preset", "tiny", "--out", str(out)]
    result = subprocess.run(collect, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    text = (out / "results.md").read_text()
    assert "grass-train -m experiment=bench_small model=scratch_llama" in text
    assert "python experiments/collect_results.py" in text
    assert re.search(r"Machine: \d+ CPU cores", text)
    for task in ("arithmetic", "multiple_choice"):
        section = text.split(f"## {task}\n", 1)[1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
        assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == METHODS
        for row in rows:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            assert len(cells) == 8 and all(cells) and not any("nan" in cell for cell in cells), row
        lisa = next(row for row in rows if row.startswith("| LISA |"))
        assert lisa.rstrip(" |").endswith("1.00x")
    assert "| LoRA | r=8, lora_alpha=16" in text and "| GRASS | n_active=2" in text
    for figure in ("accuracy_vs_memory.png", "importance_by_task.png", "selection_frequency.png"):
        assert (out / figure).stat().st_size > 10_000, figure
        assert f"]({figure})" in text

    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 10
    by_method = {(run["method"], run["task"]): run for run in runs}
    full, lora = by_method["full", "arithmetic"], by_method["lora", "arithmetic"]
    assert lora["trainable_parameters_per_step"] < full["trainable_parameters_per_step"]
    assert lora["optimizer_state_bytes_peak"] < full["optimizer_state_bytes_peak"]
    assert sum(by_method["grass", "arithmetic"]["layer_selection_counts"]) == 2, "one window after 10 probe steps"
