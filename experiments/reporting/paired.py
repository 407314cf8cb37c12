"""The deep benchmark's statistics: a learning rate per method chosen on validation, test scores, paired gaps.

Every method runs every learning rate of one grid on every seed. For each task and method (a sampler at each
gamma counts as its own method), the learning rate with the best mean validation exact match over seeds is
chosen, and the method is reported by its test exact match at that rate. Two methods are compared seed by
seed (the same seed means the same data order and the same base for both), in points of exact match, with a
Student-t 95% interval over the paired differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from reporting.runs import METHOD_LABELS, Run

#: Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom; the normal 1.96 beyond.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

#: The paired comparisons reported: (name, the method that should win, the one it is measured against).
COMPARISONS = (
    ("GRASS-LISA", "grass", "lisa"),
    ("GRASS-GRASS*", "grass", "grass_static"),
    ("GRASS calibrated-LISA", "grass_calibrated", "lisa"),
    ("GRASS calibrated-GRASS* calibrated", "grass_calibrated", "grass_static_calibrated"),
)


@dataclass(frozen=True)
class Variant:
    """A method as the benchmark counts it: a sampler at one gamma, or full fine-tuning, or LoRA.

    A sampler whose temperature is calibrated (``target_effective_layers`` set) is its own method,
    ``grass_calibrated`` or ``grass_static_calibrated``, so that it can run beside the paper's defaults.
    """

    method: str
    n_active: int | None

    @property
    def label(self) -> str:
        """``"GRASS (gamma=2)"``, ``"LoRA"``."""
        name = METHOD_LABELS.get(self.method, self.method)
        return name if self.n_active is None else f"{name} (gamma={self.n_active})"


@dataclass
class Selection:
    """A variant on one task: its chosen learning rate and its scores there, in points of exact match.

    Attributes:
        variant: The method and gamma.
        learning_rate: The rate with the best mean validation score.
        validation_by_rate: Mean validation score of every rate tried.
        test_by_seed: Test score of each seed at the chosen rate.
    """

    variant: Variant
    learning_rate: float
    validation_by_rate: dict[float, float]
    test_by_seed: dict[int, float] = field(default_factory=dict)

    @property
    def test_mean(self) -> float:
        """Mean test score over seeds."""
        return statistics.fmean(self.test_by_seed.values())

    @property
    def test_std(self) -> float:
        """Sample standard deviation of the test score over seeds (``nan`` with one seed)."""
        values = list(self.test_by_seed.values())
        return statistics.stdev(values) if len(values) > 1 else float("nan")


def variant_of(run: Run) -> Variant:
    """The run's method (``_calibrated`` when its temperature is calibrated), with its gamma when it samples."""
    sampler = run.config.get("sampler") or {}
    if run.method not in ("lisa", "grass_static", "grass"):
        return Variant(run.method, None)
    calibrated = sampler.get("target_effective_layers") is not None
    return Variant(f"{run.method}_calibrated" if calibrated else run.method, sampler.get("n_active"))


def learning_rate_of(run: Run) -> float:
    """The run's peak learning rate (``model.lr``)."""
    return float(run.config["model"]["lr"])


def held_out_score(run: Run) -> float | None:
    """A run's test score in points: its suite's average when it scored one (``evaluate_suite``), else its exact
    match on the held-out test split; ``None`` when it has neither."""
    if run.metrics.get("suite_average_percent") is not None:
        return float(run.metrics["suite_average_percent"])
    if run.metrics.get("exact_match_test") is None:
        return None
    return 100 * float(run.metrics["exact_match_test"])


def select(runs: Sequence[Run]) -> dict[str, list[Selection]]:
    """Per task, each variant's learning rate chosen on validation and its test scores (:func:`held_out_score`) at it.

    Raises:
        ValueError: If a run has no test score (the sweep was run without ``data.num_test`` or ``evaluate_suite``).
    """
    missing = [run.directory for run in runs if held_out_score(run) is None]
    if missing:
        raise ValueError(
            f"{missing[0]} has no exact_match_test nor suite score: the benchmark needs data.num_test > 0 or "
            "evaluate_suite"
        )
    table: dict[str, list[Selection]] = {}
    for task in sorted({run.task for run in runs}):
        task_runs = [run for run in runs if run.task == task]
        order = list(METHOD_LABELS)
        variants = sorted(
            {variant_of(run) for run in task_runs},
            key=lambda v: (order.index(v.method) if v.method in order else len(order), v.n_active or 0),
        )
        for variant in variants:
            own = [run for run in task_runs if variant_of(run) == variant]
            rates = sorted({learning_rate_of(run) for run in own})
            validation = {
                rate: 100
                * statistics.fmean(
                    float(run.metrics["exact_match_after"]) for run in own if learning_rate_of(run) == rate
                )
                for rate in rates
            }
            best = max(rates, key=lambda rate: (validation[rate], -rate))
            chosen = Selection(variant, best, validation)
            for run in own:
                if learning_rate_of(run) == best:
                    chosen.test_by_seed[run.seed] = held_out_score(run)
            table.setdefault(task, []).append(chosen)
    return table


def paired_difference(better: dict[int, float], baseline: dict[int, float]) -> dict[str, object]:
    """The mean of the seed-by-seed differences, with a Student-t 95% interval.

    Args:
        better: Score per seed of the method measured.
        baseline: Score per seed of the method it is measured against.

    Returns:
        ``{"mean": m, "ci95": [lo, hi], "n": k}`` over the seeds both have; the interval is ``nan`` wide
        with fewer than two pairs.
    """
    differences = [better[seed] - baseline[seed] for seed in sorted(set(better) & set(baseline))]
    mean = statistics.fmean(differences) if differences else float("nan")
    if len(differences) < 2:
        return {"mean": mean, "ci95": [float("nan"), float("nan")], "n": len(differences)}
    degrees = len(differences) - 1
    quantile = T_975[degrees - 1] if degrees <= len(T_975) else 1.96
    half = quantile * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(differences)}


def paired_comparisons(
    selections: Sequence[Selection], comparisons: Sequence[tuple[str, str, str]] = COMPARISONS
) -> dict[str, dict[str, object]]:
    """``comparisons`` at each gamma, and pooled over gammas (pairs keyed by gamma and seed).

    A baseline without gamma (full fine-tuning, LoRA) is compared with the method at every gamma.

    Returns:
        ``{"GRASS-LISA": ..., "GRASS-LISA (gamma=2)": ..., ...}`` for the comparisons whose methods ran.
    """
    by_variant = {selection.variant: selection for selection in selections}

    def baseline_of(method: str, gamma: int | None) -> Variant:
        return Variant(method, gamma) if Variant(method, gamma) in by_variant else Variant(method, None)

    result: dict[str, dict[str, object]] = {}
    for name, better, baseline in comparisons:
        gammas = sorted(
            v.n_active for v in by_variant if v.method == better and baseline_of(baseline, v.n_active) in by_variant
        )
        pooled_better: dict[int, float] = {}
        pooled_baseline: dict[int, float] = {}
        for gamma in gammas:
            a = by_variant[Variant(better, gamma)].test_by_seed
            b = by_variant[baseline_of(baseline, gamma)].test_by_seed
            result[f"{name} (gamma={gamma})"] = paired_difference(a, b)
            pooled_better |= {gamma * 10_000 + seed: score for seed, score in a.items()}
            pooled_baseline |= {gamma * 10_000 + seed: score for seed, score in b.items()}
        if gammas:
            result[name] = paired_difference(pooled_better, pooled_baseline)
    return result
