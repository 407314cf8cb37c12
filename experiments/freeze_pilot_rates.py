"""Freeze the learning rates a pilot chose into the benchmark's method configs.

    python experiments/freeze_pilot_rates.py experiments/results/real/pilot.json conf/real_method

Each method's ``conf/<group>/<method>.yaml`` holds its rate as the one ``lr:`` line under ``model:``; that line is
rewritten with the rate ``pilot.json`` chose, and every other line is left as it is.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LR_LINE = re.compile(r"^(\s+lr: ).*$", re.MULTILINE)


def freeze(pilot_json: Path, method_dir: Path) -> dict[str, float]:
    """Write each method's chosen rate into ``method_dir/<method>.yaml``.

    Returns:
        The rate written per method.

    Raises:
        ValueError: When a method's file does not hold exactly one ``lr:`` line.
    """
    chosen = {entry["method"]: float(entry["chosen"]) for entry in json.loads(pilot_json.read_text()).values()}
    for method, rate in chosen.items():
        path = method_dir / f"{method}.yaml"
        text = path.read_text()
        if len(LR_LINE.findall(text)) != 1:
            raise ValueError(f"{path} must hold exactly one 'lr:' line to rewrite")
        path.write_text(LR_LINE.sub(lambda match, rate=rate: f"{match.group(1)}{rate:.1e}", text))
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pilot_json", type=Path)
    parser.add_argument("method_dir", type=Path)
    args = parser.parse_args(argv)
    for method, rate in freeze(args.pilot_json, args.method_dir).items():
        print(f"{method}: lr {rate:g}")


if __name__ == "__main__":
    main()
