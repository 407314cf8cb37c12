"""Turn a benchmark sweep into ``experiments/results/<preset>/results.md``, ``runs.json`` and figures.

    grass-train -m experiment=bench_small
    python experiments/collect_results.py outputs/bench_small/<time> --preset small
    grass-train -m experiment=bench_deep
    python experiments/collect_results.py outputs/bench_deep/<time> --preset deep
    grass-train -m experiment=bench_deep_sensitivity
    python experiments/collect_results.py outputs/bench_deep_sensitivity/<time> --preset deep_sensitivity
    grass-train -m experiment=bench_long_pilot
    python experiments/collect_results.py outputs/bench_long_pilot/<time> --preset long_pilot
    grass-train -m experiment=bench_long
    python experiments/collect_results.py outputs/bench_long/<time> --preset long
    grass-train -m experiment=bench_real_pilot
    python experiments/collect_results.py outputs/bench_real_pilot/<time> --preset real_pilot
    python experiments/freeze_pilot_rates.py experiments/results/real/pilot.json conf/real_method
    grass-train -m experiment=bench_real
    python experiments/collect_results.py outputs/bench_real/<time> --preset real
    grass-train -m experiment=bench_units
    python experiments/collect_results.py outputs/bench_units/<time> --preset units
    grass-train -m experiment=bench_units_long
    python experiments/collect_results.py outputs/bench_units_long/<time> --preset units_long

The `deep` preset chooses each method's learning rate on validation and reports test scores with paired
intervals (``summary.json``); the sensitivity preset tabulates GRASS over T_s and its spread setting. The
`long` preset reports each method at the rate its pilot chose, with learning curves and windows per run; the
pilot (``--preset long_pilot``) writes ``pilot.md`` and ``pilot.json`` beside the long results. The `units` and
`units_long` presets compare module-wise GRASS with layer-wise GRASS and LISA (``results/units/``).

The sweep's command is read back from the sweep's ``multirun.yaml`` and written into ``results.md`` with
this script's own command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from functools import partial
from pathlib import Path

from omegaconf import OmegaConf
from reporting import write_results
from reporting.deep_report import write_deep_results
from reporting.long_report import write_long_results
from reporting.pilot import write_pilot_results
from reporting.real_report import write_real_results
from reporting.sensitivity import write_sensitivity_results
from reporting.units_report import write_units_results

RESULTS_DIR = Path(__file__).parent / "results"
#: Presets whose results go into another preset's directory.
RESULTS_OF = {"long_pilot": "long", "real_pilot": "real", "units": "units/real", "units_long": "units/long"}


def sweep_command(sweep_dir: Path) -> str:
    """The ``grass-train -m ...`` command line that produced ``sweep_dir``, from its ``multirun.yaml``.

    Hydra's own overrides (``hydra/launcher=basic``) come first, then the job's, as Hydra records them.
    """
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        raise FileNotFoundError(f"{multirun} is missing: is {sweep_dir} a grass-train -m sweep directory?")
    overrides = OmegaConf.load(multirun).hydra.overrides
    hydra = [o for o in overrides.hydra if not o.startswith("hydra.mode=")]  # the launcher, if one was chosen
    return " ".join(["grass-train", "-m", *(shlex.quote(o) for o in [*hydra, *overrides.task])])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory that grass-train -m wrote")
    parser.add_argument("--preset", required=True, help="the preset's name: results go to experiments/results/<preset>")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of experiments/results/<preset>")
    args = parser.parse_args(argv)
    out_dir = args.out or RESULTS_DIR / RESULTS_OF.get(args.preset, args.preset)
    collector = " ".join(
        ["python", "experiments/collect_results.py", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]
    )
    writers = {
        "deep": write_deep_results,
        "deep_sensitivity": write_sensitivity_results,
        "long": write_long_results,
        "long_pilot": write_pilot_results,
        "real": write_real_results,
        "real_pilot": partial(write_pilot_results, preset="real", criterion="val_loss"),
        "units": write_units_results,
        "units_long": write_units_results,
    }
    writer = writers.get(args.preset, write_results)
    path = writer(
        args.sweep_dir, out_dir, f"Benchmark: the `{args.preset}` preset", [sweep_command(args.sweep_dir), collector]
    )
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    main()
