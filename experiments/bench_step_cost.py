"""Host time of a steady offloaded step per streamed tensor, at 540 and 2,160 tensors, side by side.

A step over many small tensors under a budget of eight of them streams every tensor, so the time is the store's
and the optimizer wrapper's bookkeeping, not arithmetic. Linear bookkeeping keeps the time per tensor flat as
the tensors grow; a quadratic path raises it with their number. One thread, best of five steady steps:

    python experiments/bench_step_cost.py      # prints one line; run it on two checkouts to compare them
"""

from __future__ import annotations

import time

import torch

from lightning_grass.offload import HostTier, OffloadedOptimizer, TensorStateStore, device_bytes_while_stepped

#: Tensors stepped in the two runs compared.
SIZES = (540, 2160)


def seconds_per_tensor(tensors: int, budget_tensors: int = 8, steps: int = 5) -> float:
    """The best host time of a steady step over ``tensors`` four-element tensors, divided by their number."""
    params = [torch.nn.Parameter(torch.full((4,), float(i))) for i in range(tensors)]
    inner = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    budget = budget_tensors * device_bytes_while_stepped(inner, params[0], False)
    store = TensorStateStore(inner, params, HostTier(torch.device("cpu"), [36] * tensors), budget)
    offloaded = OffloadedOptimizer(inner, store)
    for p in params:
        p.grad = torch.ones(4)
    offloaded.step()  # creates the states; the steps timed fetch and write them back
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        offloaded.prefetch()
        offloaded.step()
        best = min(best, time.perf_counter() - start)
    store.close()
    return best / tensors


def main() -> None:
    """Print the time per tensor at both sizes and their ratio."""
    torch.set_num_threads(1)
    small, large = (seconds_per_tensor(size) for size in SIZES)
    print(
        f"{small * 1e6:.1f} us per tensor at {SIZES[0]} tensors, {large * 1e6:.1f} us at {SIZES[1]}: "
        f"ratio {large / small:.2f}"
    )


if __name__ == "__main__":
    main()
