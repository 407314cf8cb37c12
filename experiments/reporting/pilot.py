"""``write_pilot_results``: the learning rate of each method of a benchmark, chosen in its pilot.

The pilot runs every method at two or three rates on development seeds that the benchmark does not report.
A method's rate is the one with the best validation score averaged over the pilot's tasks and seeds (ties: the
smaller rate), and is then frozen in ``conf/<preset>_method/<method>.yaml``. The score is the validation exact
match for the `long` benchmark and the final validation loss for the `real` one, whose short pilot generates
nothing (:data:`CRITERIA`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reporting.markdown import describe_machine, report_header, sweep_minutes
from reporting.paired import Variant, learning_rate_of, variant_of
from reporting.runs import METHOD_LABELS, Run, load_runs

#: How a pilot scores a run: a label, the score, and whether higher is better.
CRITERIA: dict[str, tuple[str, Any, bool]] = {
    "exact_match": ("validation exact match (%)", lambda run: 100 * float(run.metrics["exact_match_after"]), True),
    "val_loss": ("final validation loss", lambda run: float(run.metrics["val/loss"]), False),
}


def pilot_choices(runs: Sequence[Run], criterion: str = "exact_match") -> dict[Variant, dict[str, Any]]:
    """Each method's mean validation score per rate and the rate chosen (see :data:`CRITERIA`).

    Returns:
        ``{variant: {"by_rate": {rate: score}, "by_task": {task: {rate: score}}, "chosen": rate}}``, in the
        order of ``METHOD_LABELS`` then gamma.
    """
    _, score, higher_is_better = CRITERIA[criterion]
    order = list(METHOD_LABELS)
    variants = sorted(
        {variant_of(run) for run in runs},
        key=lambda v: (order.index(v.method) if v.method in order else len(order), v.n_active or 0),
    )
    choices: dict[Variant, dict[str, Any]] = {}
    for variant in variants:
        own = [run for run in runs if variant_of(run) == variant]
        rates = sorted({learning_rate_of(run) for run in own})
        by_task = {
            task: {
                rate: statistics.fmean(score(run) for run in own if run.task == task and learning_rate_of(run) == rate)
                for rate in rates
            }
            for task in sorted({run.task for run in own})
        }
        by_rate = {rate: statistics.fmean(scores[rate] for scores in by_task.values()) for rate in rates}
        sign = 1 if higher_is_better else -1
        chosen = max(rates, key=lambda rate: (sign * by_rate[rate], -rate))
        choices[variant] = {"by_rate": by_rate, "by_task": by_task, "chosen": chosen}
    return choices


def write_pilot_results(
    sweep_dir: str | Path,
    out_dir: str | Path,
    title: str,
    commands: Sequence[str],
    preset: str = "long",
    criterion: str = "exact_match",
) -> Path:
    """Write ``pilot.md`` and ``pilot.json`` (``{label: {"chosen", "by_rate", "by_task"}}``) into ``out_dir``.

    Args:
        sweep_dir: The pilot's ``grass-train -m`` sweep directory.
        out_dir: Where to write; created if missing.
        title: The heading of ``pilot.md``.
        commands: The commands that produced the results, shown verbatim.
        preset: The benchmark the rates are for: they are frozen in ``conf/<preset>_method/``.
        criterion: A key of :data:`CRITERIA`.

    Returns:
        The path of ``pilot.md``.
    """
    out_dir = Path(out_dir)
    runs = load_runs(sweep_dir)
    choices = pilot_choices(runs, criterion)
    criterion_label = CRITERIA[criterion][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        variant.label: {
            "method": variant.method,
            "chosen": choice["chosen"],
            "by_rate": {str(rate): score for rate, score in choice["by_rate"].items()},
            "by_task": {task: {str(r): s for r, s in scores.items()} for task, scores in choice["by_task"].items()},
        }
        for variant, choice in choices.items()
    }
    (out_dir / "pilot.json").write_text(json.dumps(record, indent=2) + "\n")
    rates = sorted({learning_rate_of(run) for run in runs})
    tasks = sorted({run.task for run in runs})
    seeds = sorted({run.seed for run in runs})
    parts = [
        *report_header(title, commands, runs),
        f"Machine: {describe_machine(runs[0].metrics.get('machine', {}))}. The pilot ran for "
        f"{sweep_minutes(runs):.1f} min.",
        "",
        f"Every method ran every rate of {rates} on development seeds {seeds}, which the benchmark does not "
        f"report, for {sorted({int(run.metrics['optimizer_steps']) for run in runs})} steps. The table gives the "
        f"{criterion_label} per task and its mean over tasks; the rate with the best mean (ties: the smaller rate) "
        f"is frozen in `conf/{preset}_method/<method>.yaml`.",
        "",
        "| method | " + " | ".join(f"{task} at {rate:g}" for task in tasks for rate in rates)
        + " | " + " | ".join(f"mean at {rate:g}" for rate in rates) + " | chosen |",
        "|---|" + "---|" * (len(tasks) * len(rates) + len(rates) + 1),
    ]  # fmt: skip
    for variant, choice in choices.items():
        digits = 1 if criterion == "exact_match" else 3
        cells = [f"{choice['by_task'][task][rate]:.{digits}f}" for task in tasks for rate in rates]
        cells += [f"{choice['by_rate'][rate]:.{digits}f}" for rate in rates]
        parts.append(f"| {variant.label} | " + " | ".join(cells) + f" | {choice['chosen']:g} |")
    path = out_dir / "pilot.md"
    path.write_text("\n".join(parts) + "\n")
    return path
