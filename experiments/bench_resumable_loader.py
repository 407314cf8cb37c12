"""What resumable data loading costs per step: torchdata's ``StatefulDataLoader`` against a plain ``DataLoader``.

``InstructionDataModule`` serves its training batches through a ``StatefulDataLoader`` so that runs resume
mid-epoch exactly. This times one pass over the same tokenized split with each loader, alternating them
so that both see the same load on a shared machine, and the ``state_dict()`` that Lightning takes at each
checkpoint.

    python experiments/bench_resumable_loader.py      # writes experiments/results/resumable_loader.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_grass.app.data import InstructionDataModule, build_char_tokenizer, collate_batch

RESULTS = Path(__file__).parent / "results" / "resumable_loader.md"


def seconds_per_batch(loader) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tokenizer = build_char_tokenizer()
    datamodule = InstructionDataModule(
        "arithmetic", tokenizer, num_train=args.examples, num_val=16, batch_size=args.batch_size
    )
    datamodule.setup("fit")
    stateful = datamodule.train_dataloader()
    plain = DataLoader(
        stateful.dataset,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=partial(collate_batch, pad_token_id=tokenizer.pad_token_id),
    )
    timings: dict[str, list[float]] = {"DataLoader": [], "StatefulDataLoader": []}
    for _ in range(args.repeats):
        timings["DataLoader"].append(seconds_per_batch(plain))
        timings["StatefulDataLoader"].append(seconds_per_batch(stateful))
    iterator = iter(stateful)
    for _ in range(len(stateful) // 2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(100):
        stateful.state_dict()
    state_seconds = (time.perf_counter() - start) / 100

    plain_median = statistics.median(timings["DataLoader"])
    stateful_median = statistics.median(timings["StatefulDataLoader"])
    lines = [
        "# Resumable data loading: what it costs per step",
        "",
        "Produced by `python experiments/bench_resumable_loader.py`: one pass over the same tokenized training split "
        f"({args.examples} arithmetic examples, batches of {args.batch_size}, one thread, no workers) with each "
        f"loader, alternating, {args.repeats} passes each; medians.",
        "",
        "| loader | ms per batch | ratio |",
        "|---|---|---|",
        f"| DataLoader | {plain_median * 1e3:.3f} | 1.00 |",
        f"| StatefulDataLoader | {stateful_median * 1e3:.3f} | {stateful_median / plain_median:.2f} |",
        "",
        f"`state_dict()` in the middle of an epoch, which Lightning calls once per checkpoint: "
        f"{state_seconds * 1e6:.0f} µs.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
