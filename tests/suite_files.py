"""Tiny test sets in LLM-Adapters' layout, written by the tests (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_grass.app.suites import SUITES


def default_label(suite: str, name: str) -> str:
    """A label every set's rule accepts: 4 for a number, else the set's first choice."""
    rule = next(b.rule for b in SUITES[suite] if b.name == name)
    return rule.choices[0] if hasattr(rule, "choices") else "4.0"


def write_suite(root: Path, suite: str, records: dict[str, list[dict]] | None = None, nested: bool = True) -> Path:
    """Write ``<root>/dataset/<set>/test.json`` (``nested``) or ``<root>/<set>/test.json`` for every set of ``suite``.

    ``records`` gives some sets' records; every other set gets three questions with a default label.
    """
    folder = root / "dataset" if nested else root
    for benchmark in SUITES[suite]:
        rows = (records or {}).get(benchmark.name)
        if rows is None:
            label = default_label(suite, benchmark.name)
            rows = [
                {"instruction": f"Q{i} of {benchmark.name}?", "input": "", "output": "", "answer": label}
                for i in range(3)
            ]
        path = folder / benchmark.name / "test.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return root
