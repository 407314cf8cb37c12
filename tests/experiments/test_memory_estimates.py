"""The memory-estimate table: the script's output, the committed result and the README agree."""

from pathlib import Path

import memory_estimates

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_and_the_committed_result_show_the_table_the_script_computes():
    rows = memory_estimates.rows()
    assert len(rows) == 12, "three models; full fine-tuning, LISA, GRASS streamed per tensor and in chunks"
    readme = (REPO / "README.md").read_text()
    committed = (REPO / "experiments" / "results" / "memory_estimates.md").read_text()
    for row in rows:
        assert row in readme, row
        assert row in committed, row
