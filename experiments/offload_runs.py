"""One training configuration per fresh process, measured: what bench_offload, bench_gpu and bench_real_memory share.

A run builds a Llama from a config (random weights: memory and speed do not depend on them) or loads a pretrained
one from a Hugging Face directory (``ModelShape.from_pretrained``), trains it for a few steps with the run's sampler,
offload tier, budget, overlap and precision, and prints its measurements as JSON on its last line of output. It
trains under ``GRASSStrategy`` on one device, or under ``GRASSFSDPStrategy`` on one rank, where it also saves a
sharded checkpoint at its last step and resumes from it. Each run is its own process, so its peak memory
(``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` on a GPU, the process's peak RSS on the CPU) is its
own, and a run that fails or hangs costs only its own row: a run killed at its timeout, or failing, after it
printed its measurements keeps them. The process prints its line as soon as it has it, then destroys the process group a
``grass_fsdp`` run created, so that a hang there (NCCL's at exit is a known one) cannot cost the line.

    python experiments/offload_runs.py '{"shape": {...}, "run": {...}, "accelerator": "cpu"}'
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_grass import GRASSCallback, GRASSFSDPStrategy, GRASSStrategy
from lightning_grass.byte_size import format_bytes
from lightning_grass.offload import device_bytes_while_stepped, needs_master
from lightning_grass.offload.row_chunks import row_ranges, rows_per_chunk

#: Seconds one run may take before it is killed: a TinyLlama-sized run takes well under a minute on an H200.
DEFAULT_TIMEOUT_S = 150.0
#: A run is not started with less time than this left before the deadline: importing torch, Lightning and
#: transformers and building the model take about half of it.
MIN_START_S = 30.0
#: The strategies a run can train under.
STRATEGIES = ("grass", "grass_fsdp")
#: AdamW's settings, in the module's optimizer and in the budget's arithmetic alike.
LR, WEIGHT_DECAY = 1e-5, 0.01


@dataclass(frozen=True)
class ModelShape:
    """A Llama's size and the batch it trains on.

    Attributes:
        layers: Transformer blocks.
        hidden: Hidden size.
        intermediate: The MLP's intermediate size.
        heads: Attention heads (each ``hidden // heads`` wide).
        vocab: Vocabulary size.
        seq_len: Tokens per sequence.
        batch_size: Sequences per batch.
        steps: Optimizer steps a run trains.
        kv_heads: Key and value heads (grouped-query attention); ``None`` is ``heads``.
        tied_embeddings: The LM head shares the token embedding's weight.
        weights_dir: A Hugging Face directory (``config.json`` and ``model.safetensors``) whose pretrained weights
            the model is built from, instead of random ones; its config must have this shape (build the shape with
            :meth:`from_pretrained`).
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    seq_len: int
    batch_size: int
    steps: int
    kv_heads: int | None = None
    tied_embeddings: bool = False
    weights_dir: str | None = None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, seq_len: int, batch_size: int, steps: int) -> ModelShape:
        """The shape of the Llama in a Hugging Face directory, whose weights a run then loads.

        Raises:
            ValueError: When the directory's model is not a Llama (``model_type`` other than ``"llama"``).
        """
        directory = Path(directory).resolve()
        config = LlamaConfig.from_pretrained(directory)
        if config.model_type != "llama":
            raise ValueError(f"{str(directory)!r} holds a {config.model_type!r} model; offload_runs trains a Llama")
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            vocab=config.vocab_size,
            seq_len=seq_len,
            batch_size=batch_size,
            steps=steps,
            kv_heads=config.num_key_value_heads,
            tied_embeddings=bool(config.tie_word_embeddings),
            weights_dir=str(directory),
        )

    def parameters(self) -> int:
        """The parameter count (no biases)."""
        kv_width = (self.kv_heads or self.heads) * (self.hidden // self.heads)
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_width
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + (1 if self.tied_embeddings else 2) * self.vocab * self.hidden + self.hidden

    def llama_config(self) -> LlamaConfig:
        """The model's config: the pretrained one from ``weights_dir``, else one of this shape.

        Raises:
            ValueError: When ``weights_dir``'s config does not have this shape; the message names each field that
                differs.
        """
        if self.weights_dir is None:
            return LlamaConfig(
                num_hidden_layers=self.layers,
                hidden_size=self.hidden,
                intermediate_size=self.intermediate,
                num_attention_heads=self.heads,
                num_key_value_heads=self.kv_heads or self.heads,
                vocab_size=self.vocab,
                max_position_embeddings=self.seq_len,
                tie_word_embeddings=self.tied_embeddings,
            )
        stored = ModelShape.from_pretrained(self.weights_dir, self.seq_len, self.batch_size, self.steps)
        differ = [
            f"{name}={getattr(self, name)!r} but the directory's is {getattr(stored, name)!r}"
            for name in ("layers", "hidden", "intermediate", "heads", "vocab", "kv_heads", "tied_embeddings")
            if getattr(self, name) != getattr(stored, name)
        ]
        if differ:
            raise ValueError(
                f"ModelShape does not match the model in {self.weights_dir!r}: {'; '.join(differ)}; build the shape "
                "with ModelShape.from_pretrained"
            )
        return LlamaConfig.from_pretrained(self.weights_dir)


@dataclass(frozen=True)
class Run:
    """One configuration: what trains, under which strategy, where its optimizer state lives, in which precision.

    Attributes:
        name: The run's row in a table.
        sampler: ``"full"`` (every layer), ``"lisa"`` or ``"grass"``.
        offload: The strategy's ``offload`` tier.
        max_resident_bytes: An explicit budget for the offloaded states on the device.
        budget_tensors: A budget that holds this many of the largest block tensors while they are stepped
            (state, step counter, fp32 master, master gradient and the optimizer's temporaries), computed in the
            training process with ``device_bytes_while_stepped`` from the model and optimizer it built. At most
            one of the three budgets; none means no budget. Under ``grass_fsdp`` a budget bounds the rank's
            local shards, which on its one rank are the whole tensors, so it means the same as under ``grass``.
        budget_chunks: A budget under which the largest offloaded tensor (of every parameter with
            ``offload_always_on``, the embedding or LM head; else of the block tensors) is stepped in this many
            chunks of rows: twice what one chunk of ``ceil(rows / budget_chunks)`` rows needs while stepped, since
            the strategy cuts chunks of at most half the budget (one is stepped while the next is fetched). About
            ``2 / budget_chunks`` of that tensor's bytes while stepped, computed in the training process like
            ``budget_tensors``; at least 2.
        offload_always_on: The strategy's ``offload_always_on``: the embeddings', LM head's and final norm's
            states are offloaded (and streamed, under a budget) too.
        overlap: The strategy's ``overlap`` (transfers on a second stream).
        precision: The Trainer's precision.
        n_active: Layers the sampler trains at a time.
        sample_every: Steps between draws.
        probe_steps: GRASS's probing steps before its first draw.
        skip_non_finite: The callback's ``skip_non_finite`` (its per-step read of the non-finite check).
        strategy: ``"grass"`` (``GRASSStrategy`` on one device) or ``"grass_fsdp"`` (``GRASSFSDPStrategy`` on one
            rank: NCCL on a GPU, gloo on the CPU), which fits, saves a sharded checkpoint at its last step and
            resumes from it in a second Trainer.
        resume_steps: ``"grass_fsdp"`` only: the steps trained after resuming.
    """

    name: str
    sampler: str
    offload: str = "none"
    max_resident_bytes: int | None = None
    budget_tensors: int | None = None
    budget_chunks: int | None = None
    offload_always_on: bool = False
    overlap: bool = True
    precision: str = "32-true"
    n_active: int = 2
    sample_every: int = 5
    probe_steps: int = 3
    skip_non_finite: bool = True
    strategy: str = "grass"
    resume_steps: int = 4

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Run {self.name!r}: strategy={self.strategy!r} is not one of {STRATEGIES}")
        budgets = {
            name: value
            for name, value in (
                ("max_resident_bytes", self.max_resident_bytes),
                ("budget_tensors", self.budget_tensors),
                ("budget_chunks", self.budget_chunks),
            )
            if value is not None
        }
        if len(budgets) > 1:
            given = " and ".join(f"{name}={value}" for name, value in budgets.items())
            count = "two" if len(budgets) == 2 else "three"
            raise ValueError(f"Run {self.name!r}: {given} are {count} budgets; give one")
        if self.budget_chunks is not None and self.budget_chunks < 2:
            raise ValueError(
                f"Run {self.name!r}: budget_chunks={self.budget_chunks} cuts no tensor into chunks; give at least 2"
            )

    def describe(self) -> str:
        """The settings that differ between runs, for a table."""
        if self.budget_tensors is not None:
            budget = f"{self.budget_tensors} largest block tensors while stepped"
        elif self.budget_chunks is not None:
            budget = f"2 of {self.budget_chunks} chunks of rows of the largest tensor while stepped"
        else:
            budget = "none" if self.max_resident_bytes is None else format_bytes(self.max_resident_bytes)
        sampler = "every layer" if self.sampler == "full" else f"{self.sampler}, n_active={self.n_active}"
        always_on = "; offload_always_on=True" if self.offload_always_on else ""
        checked = "" if self.skip_non_finite else "; skip_non_finite=False"
        settings = (
            f"{sampler}; offload={self.offload}{always_on}; budget {budget}; overlap={self.overlap}; {self.precision}"
        )
        prefix = "grass_fsdp on 1 rank, save and resume; " if self.strategy == "grass_fsdp" else ""
        return f"{prefix}{settings}{checked}"


def measure(
    shape: ModelShape,
    runs: list[Run],
    accelerator: str,
    repeats: int = 1,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    deadline: float | None = None,
    on_result: Callable[[Run, dict[str, list[dict[str, Any]]]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every run ``repeats`` times, each in a fresh process, in ABBA order so that drift hits all alike.

    No run raises here. Every record has ``failed`` and ``wall_seconds``: ``failed`` is ``None`` for a run that
    measured (the record then holds its measurements, see :func:`train`), and otherwise says why it did not:
    the last line of its error output, ``timed out after N s``, or that it printed no measurements; the next
    run starts all the same. A run that printed its measurements keeps them whatever happened after (a hang
    killed at its timeout, a crash at exit): ``failed`` is ``None`` and ``failed_after_measurements`` says what
    happened, as ``failed`` would have (``timed out after N s``, the last line of its error output); no other
    record has ``failed_after_measurements``.

    Args:
        shape: The model and batch every run trains.
        runs: The configurations.
        accelerator: ``"cpu"`` or ``"gpu"``.
        repeats: Times each configuration runs.
        timeout_s: Seconds one run may take; it is killed then, with every process it started.
        deadline: A ``time.monotonic()`` time by which every run must have ended: a run's timeout is cut to it,
            and a run that would have under ``MIN_START_S`` is not started (its record says so).
        on_result: Called after each run, before the next starts, with the run and every record so far (to
            write a report as the results arrive).

    Returns:
        Each run's name and its records, in the order they ran.
    """
    results: dict[str, list[dict[str, Any]]] = {run.name: [] for run in runs}
    for repeat in range(repeats):
        for run in runs if repeat % 2 == 0 else runs[::-1]:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < MIN_START_S:
                record = {
                    "failed": f"not started, the check's time limit leaves {max(left, 0):.0f} s, under the "
                    f"{MIN_START_S:.0f} s a run needs",
                    "wall_seconds": 0.0,
                }
            else:
                job = json.dumps({"shape": asdict(shape), "run": asdict(run), "accelerator": accelerator})
                record = _run_job([sys.executable, __file__, job], timeout_s if left is None else min(timeout_s, left))
            results[run.name].append(record)
            if on_result is not None:
                on_result(run, results)
    return results


def _run_job(command: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one job's command in a fresh process (its own session, so that a timeout kills all it started); its
    record, from the last JSON line it printed."""
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        ended = _how_it_ended(process.returncode, stderr)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()  # what it printed before it was killed
        ended = f"timed out after {timeout_s:.0f} s"
    wall = time.monotonic() - start
    measured = _last_json_line(stdout)
    if measured is None:
        if ended is not None:
            return {"failed": ended, "wall_seconds": wall}
        lines = stdout.strip().splitlines()
        last = lines[-1] if lines else "nothing"
        return {"failed": f"printed no measurements; its last line of output: {last}", "wall_seconds": wall}
    if ended is None:
        return {**measured, "failed": None, "wall_seconds": wall}
    return {**measured, "failed": None, "failed_after_measurements": ended, "wall_seconds": wall}


def _how_it_ended(returncode: int, stderr: str) -> str | None:
    """``None`` for exit status 0; else what went wrong, from the last line of the process's error output."""
    if returncode == 0:
        return None
    errors = [line.strip() for line in stderr.splitlines() if line.strip()]
    if returncode < 0:
        killed = f"killed by {signal.Signals(-returncode).name}"
        return f"{killed}; last error line: {errors[-1]}" if errors else killed
    return errors[-1] if errors else f"exit status {returncode} and no error output"


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    """The last line of ``stdout`` that is a JSON object (a run's measurements), or ``None``."""
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


class CausalLM(pl.LightningModule):
    """A Llama of ``shape`` in ``dtype`` on ``device``, trained with AdamW.

    Its weights are random (seed 0), or, with ``shape.weights_dir``, that directory's, read into the model's own
    memory by :func:`load_safetensors`.
    """

    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        config = shape.llama_config()
        torch.manual_seed(0)
        with torch.device(device):
            self.model = LlamaForCausalLM(config).to(dtype)
        if shape.weights_dir is not None:
            load_safetensors(self.model, Path(shape.weights_dir) / "model.safetensors")

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The causal language-modelling loss of the batch."""
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over every parameter."""
        return _adamw(self.parameters())


#: safetensors' names of the dtypes a checkpoint's weights come in.
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def load_safetensors(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Read a ``.safetensors`` file into ``model``'s parameters, one tensor at a time, with plain file reads.

    ``from_pretrained`` keeps the weights in a memory map of the file, whose pages count in the process's RSS
    as they are read and turn into private copies as they are written; loading a state dict first holds the weights
    twice. Here each tensor is read straight into its parameter (through a temporary of the file's dtype when the
    dtypes differ, or when the parameter is not in CPU memory), so the process's RSS after loading is the model's
    own memory and loading leaves no peak above it (the page cache is not RSS). A tied weight is read once, under
    whichever of its names the file holds.

    Args:
        model: The model, built with the file's config.
        path: The file.

    Raises:
        ValueError: When the file holds a tensor that is not one of the model's parameters, or of another shape,
            or in a dtype not in ``SAFETENSORS_DTYPES``, or misses one of the model's parameters.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[int] = set()
    with open(path, "rb") as handle:
        header_bytes = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_bytes))
        data_start = 8 + header_bytes
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            param = params.get(name)
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if param is None or dtype is None or list(param.shape) != entry["shape"]:
                expected = "not a parameter" if param is None else f"the parameter is {list(param.shape)}"
                raise ValueError(
                    f"{str(path)!r}: tensor {name!r} ({entry['dtype']}, {entry['shape']}) does not fit the model "
                    f"({expected}; dtypes read: {', '.join(SAFETENSORS_DTYPES)})"
                )
            begin, end = entry["data_offsets"]
            direct = param.dtype == dtype and param.device.type == "cpu" and param.is_contiguous()
            target = param.detach() if direct else torch.empty(param.shape, dtype=dtype)
            handle.seek(data_start + begin)
            read = handle.readinto(target.reshape(-1).view(torch.uint8).numpy())
            if read != end - begin:
                raise ValueError(f"{str(path)!r}: tensor {name!r} is cut short ({read} of {end - begin} bytes)")
            if not direct:
                with torch.no_grad():
                    param.copy_(target)
            loaded.add(id(param))
    missing = [name for name, param in model.named_parameters() if id(param) not in loaded]
    if missing:
        raise ValueError(f"{str(path)!r} holds no weights for {len(missing)} parameters: {', '.join(missing[:5])}")


def rss_bytes() -> int | None:
    """The process's resident set size now (``VmRSS``), or ``None`` where ``/proc`` does not say (not Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class Meter(Callback):
    """Each step's time, the step training started at, the offload counters at its end.

    On the CPU a step's time is the wall time from its batch's start to its end. On CUDA it is read from CUDA
    events recorded on the current stream, without synchronising: from the previous batch's end to this one's
    (the first step: from its batch's start), so that the transfers a step leaves on the copy stream can overlap
    the next step's forward as they do in training, and a step's time counts every wait that reaches the compute
    stream. The events are read once, at the end of training.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: list[float] = []
        self.first_step = 0
        self.stats: dict[str, float] = {}
        self._events: list[torch.cuda.Event] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note the step training starts at (not 0 after a resume)."""
        self.first_step = trainer.global_step

    def on_train_batch_start(self, *args: Any) -> None:
        """Start the step's clock (on CUDA, only the first step's: the others start at the previous step's end)."""
        if not self.cuda:
            self._start = time.perf_counter()
        elif not self._events:
            self._events.append(_recorded_event())

    def on_train_batch_end(self, *args: Any) -> None:
        """Stop the step's clock."""
        if self.cuda:
            self._events.append(_recorded_event())
        else:
            self.seconds.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the step times off the CUDA events, and the offload counters at the end of training (of the first
        fit, for a run that resumes)."""
        if self._events:
            self._events[-1].synchronize()
            self.seconds = [begin.elapsed_time(end) / 1e3 for begin, end in itertools.pairwise(self._events)]
            self._events = []
        self.stats = dict(trainer.strategy.offload_stats)


def _recorded_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class SaveAtStep(Callback):
    """Save a checkpoint to ``path`` once ``step`` optimizer steps are done, during fit (while the tiers exist)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step = step
        self.path = path
        self.saved_at: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Save at the chosen step."""
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            self.saved_at = trainer.global_step


def train(shape: ModelShape, run: Run, accelerator: str) -> dict[str, Any]:
    """Train ``run`` for ``shape.steps`` steps and return its measurements.

    Returns:
        ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated`` on a GPU, the peak RSS on the CPU),
        ``peak_reserved_bytes`` (``torch.cuda.max_memory_reserved`` on a GPU, what the caching allocator held and
        what runs out; ``None`` on the CPU), ``step_seconds`` (each step of the first fit, see :class:`Meter`),
        ``stats`` (the strategy's offload
        counters at the end of the first fit), ``max_resident_bytes`` (the budget used, or ``None``),
        ``largest_tensor_bytes``, ``largest_tensor_chunks`` and ``chunked_tensors`` (see :func:`_budget`),
        ``device``, and the process's host memory just before the (first) fit starts, after the imports and the
        model are built and loaded: ``rss_before_fit_bytes`` (its RSS then, ``None`` where unknown) and
        ``peak_rss_before_fit_bytes`` (its peak RSS until then); a ``grass_fsdp`` run adds ``saved_at_step``,
        ``resumed_at_step`` and ``final_step``.
    """
    cuda = accelerator == "gpu"
    fit = _fit_fsdp if run.strategy == "grass_fsdp" else _fit_single_device
    measured = fit(shape, run, accelerator)
    return {
        **measured,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def _fit_single_device(shape: ModelShape, run: Run, accelerator: str) -> dict[str, Any]:
    cuda = accelerator == "gpu"
    module = CausalLM(shape, _dtype(run), "cuda" if cuda else "cpu")
    budget = _budget(module, run)
    meter = Meter(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as offload_dir:
        strategy = GRASSStrategy(
            offload=run.offload,
            offload_dir=offload_dir,
            max_resident_bytes=budget["max_resident_bytes"],
            offload_always_on=run.offload_always_on,
            overlap=run.overlap,
        )
        trainer = _trainer(accelerator, strategy, run, shape.steps, [*_sampler(run), meter])
        batches = _batches(shape)
        before = _host_memory_now()
        trainer.fit(module, batches)
    return {"step_seconds": meter.seconds, "stats": meter.stats, **budget, **before}


def _fit_fsdp(shape: ModelShape, run: Run, accelerator: str) -> dict[str, Any]:
    """Fit, save a sharded checkpoint at the last step, free everything, then resume from it for a few steps.

    The process's peak memory spans all three: each model is built straight in the run's dtype, so building
    it has no transient copy to leave out of the peak. The budget is computed from the first model, as for
    :func:`_fit_single_device`, and both fits run under it. Both fits share the process group the first one
    creates; the run's process destroys it once it has printed its measurements (``_main``).
    """
    cuda = accelerator == "gpu"
    device = "cuda" if cuda else "cpu"
    backend = None if cuda else "gloo"
    module = _built_in_dtype(shape, run, device)
    budget = _budget(module, run)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "last.ckpt"
        meter, saver = Meter(cuda), SaveAtStep(shape.steps, checkpoint)
        settings = dict(
            offload=run.offload,
            offload_dir=Path(folder) / "offload",
            max_resident_bytes=budget["max_resident_bytes"],
            offload_always_on=run.offload_always_on,
            overlap=run.overlap,
            process_group_backend=backend,
        )
        trainer = _trainer(accelerator, GRASSFSDPStrategy(**settings), run, shape.steps, [*_sampler(run), meter, saver])
        batches = _batches(shape)
        before = _host_memory_now()
        trainer.fit(module, batches)
        del trainer, module
        gc.collect()  # the first fit's sharded weights and states, before the second one builds its own

        resumed = Meter(cuda)
        steps = shape.steps + run.resume_steps
        trainer = _trainer(accelerator, GRASSFSDPStrategy(**settings), run, steps, [*_sampler(run), resumed])
        trainer.fit(_built_in_dtype(shape, run, device), _batches(shape), ckpt_path=checkpoint)
    return {
        "step_seconds": meter.seconds,
        "stats": meter.stats,
        **budget,
        **before,
        "saved_at_step": saver.saved_at,
        "resumed_at_step": resumed.first_step,
        "final_step": trainer.global_step,
    }


def _host_memory_now() -> dict[str, int | None]:
    return {"rss_before_fit_bytes": rss_bytes(), "peak_rss_before_fit_bytes": peak_rss_bytes()}


def _adamw(params: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def _budget(module: CausalLM, run: Run) -> dict[str, int | None]:
    """The run's ``max_resident_bytes`` and what it does to the largest tensor the strategy offloads.

    The budget is given, ``budget_tensors`` of the largest block tensor while stepped, or twice one of
    ``budget_chunks`` chunks of rows of the largest offloaded tensor while stepped. Also returned:
    ``largest_tensor_bytes`` (what that tensor needs while stepped), ``largest_tensor_chunks`` (the chunks of
    rows the strategy steps it in under the budget, by its own rule; 1 when it fits, ``None`` when not even one
    row does, a budget the strategy refuses at setup) and ``chunked_tensors`` (how many offloaded tensors the
    budget cannot hold whole).
    """
    blocks = list(module.model.model.layers.parameters())
    offloaded = list(module.parameters()) if run.offload_always_on else blocks
    probe = _adamw(offloaded)  # the module's optimizer settings; it allocates nothing until stepped
    needs = [device_bytes_while_stepped(probe, p, needs_master(p)) for p in offloaded]
    largest = max(range(len(offloaded)), key=needs.__getitem__)
    param = offloaded[largest]
    if run.budget_tensors is not None:
        block = max(blocks, key=torch.Tensor.numel)
        budget = run.budget_tensors * device_bytes_while_stepped(probe, block, needs_master(block))
    elif run.budget_chunks is not None:
        rows = -(-param.shape[0] // run.budget_chunks)
        chunk = rows * (param.numel() // param.shape[0])
        budget = 2 * device_bytes_while_stepped(probe, param, needs_master(param), numel=chunk)
    else:
        budget = run.max_resident_bytes
    chunks: int | None = 1
    if budget is not None and needs[largest] > budget:
        rows = rows_per_chunk(probe, param, needs_master(param), budget)
        chunks = len(row_ranges(param.shape[0], rows)) if rows else None
    return {
        "max_resident_bytes": budget,
        "largest_tensor_bytes": needs[largest],
        "largest_tensor_chunks": chunks,
        "chunked_tensors": sum(1 for need in needs if budget is not None and need > budget),
    }


def _built_in_dtype(shape: ModelShape, run: Run, device: str) -> CausalLM:
    """The run's module with every parameter created in the run's dtype: a bf16 model has no fp32 copy."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(_dtype(run))
    try:
        return CausalLM(shape, _dtype(run), device)
    finally:
        torch.set_default_dtype(default)


def _dtype(run: Run) -> torch.dtype:
    return torch.bfloat16 if run.precision == "bf16-true" else torch.float32


def _sampler(run: Run) -> list[Callback]:
    if run.sampler == "full":
        return []
    settings = dict(n_active=run.n_active, sample_every=run.sample_every, seed=0, skip_non_finite=run.skip_non_finite)
    if run.sampler == "grass":
        settings["probe_steps"] = run.probe_steps
    return [GRASSCallback(mode=run.sampler, **settings)]


def _batches(shape: ModelShape) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab, (shape.steps * shape.batch_size, shape.seq_len), generator=generator)
    return DataLoader(TensorDataset(tokens), batch_size=shape.batch_size)


def _trainer(accelerator: str, strategy: Any, run: Run, max_steps: int, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=run.precision,
        max_steps=max_steps,
        strategy=strategy,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def _destroy_process_group() -> None:
    """Destroy the default process group if a run created one (a ``grass_fsdp`` run), rather than at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _main(job: dict[str, Any]) -> None:
    """Train the job and print its measurements as one JSON line, flushed at once; then destroy the process group.

    The line is out before the group is destroyed, so a run that hangs there, or at exit, and is killed at its
    timeout keeps its measurements (see :func:`measure`).
    """
    try:
        measured = train(ModelShape(**job["shape"]), Run(**job["run"]), job["accelerator"])
        print(json.dumps(measured), flush=True)
    finally:
        _destroy_process_group()


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
