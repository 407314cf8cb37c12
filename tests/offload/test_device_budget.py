"""What the byte budget counts on the device: states with their step counters, the step's workspace, and
write-backs only until the tier releases their memory."""

import gc
import weakref

import pytest
import torch
from conftest import tiny_llama_config
from layer_windows import layer_params, train, units_of
from transformers import LlamaForCausalLM

from lightning_grass.offload import (
    HostTier,
    OffloadedOptimizer,
    TensorStateStore,
    device_bytes_while_stepped,
    expected_state_bytes,
    step_workspace_bytes,
)
from lightning_grass.offload.tensor_state_store import _Entry
from lightning_grass.offload.transfer import TensorSpec, Transfer

N = 6 * 7  # elements of the parameter below


def param(dtype=torch.float32, device="cpu"):
    return torch.nn.Parameter(torch.zeros(6, 7, dtype=dtype, device=device))


@pytest.mark.parametrize(
    ("make", "master", "state", "workspace"),
    [
        # AdamW: two fp32 moments and a 4-byte step counter; the for-loop keeps sqrt(v) and its quotient.
        (lambda p: torch.optim.AdamW([p], foreach=False), False, 8 * N + 4, 8 * N),
        (lambda p: torch.optim.AdamW([p], foreach=True), False, 8 * N + 4, 4 * N),
        (lambda p: torch.optim.AdamW([p], fused=True), False, 8 * N + 4, 0),
        # foreach=None is torch's default: the for-loop for CPU tensors.
        (lambda p: torch.optim.AdamW([p]), False, 8 * N + 4, 8 * N),
        # Adam's L2 weight decay makes a new gradient beside the temporaries.
        (lambda p: torch.optim.Adam([p], weight_decay=0.1, foreach=True), False, 8 * N + 4, 8 * N),
        (lambda p: torch.optim.Adam([p], amsgrad=True, foreach=False), False, 12 * N + 4, 8 * N),
        # bf16 on an fp32 master: fp32 moments and master (12N), the fp32 master gradient (4N).
        (lambda p: torch.optim.AdamW([p], foreach=False), True, 12 * N + 4, 4 * N + 8 * N),
        (lambda p: torch.optim.AdamW([p], fused=True), True, 12 * N + 4, 4 * N),
        # SGD keeps no step counter; momentum is one buffer, weight decay and nesterov a new gradient each.
        (lambda p: torch.optim.SGD([p], lr=0.1), False, 0, 0),
        (lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1), False, 4 * N, 4 * N),
        (lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1), False, 4 * N, 8 * N),
    ],
    ids=[
        "adamw-for-loop",
        "adamw-foreach",
        "adamw-fused",
        "adamw-default-cpu",
        "adam-l2-foreach",
        "adam-amsgrad",
        "adamw-master",
        "adamw-fused-master",
        "sgd",
        "sgd-momentum-decay",
        "sgd-nesterov-decay",
    ],
)
def test_budget_arithmetic_counts_step_counters_masters_and_temporaries(make, master, state, workspace):
    p = param(torch.bfloat16 if master else torch.float32)
    optimizer = make(p)
    assert expected_state_bytes(optimizer, p, master) == state
    assert step_workspace_bytes(optimizer, p, master) == workspace
    assert device_bytes_while_stepped(optimizer, p, master) == state + workspace


@pytest.mark.parametrize("master", [False, True], ids=["fp32-amsgrad", "bf16-master"])
def test_the_state_arithmetic_is_what_the_optimizer_allocates(master):
    p = param(torch.bfloat16 if master else torch.float32)
    optimizer = torch.optim.AdamW([p], amsgrad=not master)
    p.grad = torch.ones_like(p)
    OffloadedOptimizer(optimizer, None, [p] if master else ()).step()
    held = sum(t.numel() * t.element_size() for t in optimizer.state[p].values() if torch.is_tensor(t))
    assert held == expected_state_bytes(optimizer, p, master)


def test_tensor_spec_bytes_are_arithmetic():
    spec = TensorSpec((3, 5), torch.bfloat16, torch.device("cpu"))
    assert spec.nbytes == 30
    assert TensorSpec((2**40,), torch.float32, torch.device("meta")).nbytes == 2**42
    assert TensorSpec((), torch.float64, torch.device("cpu")).nbytes == 8


class LateTier(HostTier):
    """A host tier whose write-backs finish only when told, as a CUDA copy still in flight during forward.

    Like :class:`HostTier` on CUDA (``record_stream``), it keeps no reference to the tensors it was given.
    """

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.finished = False

    def write(self, unit, tensors):
        super().write(unit, tensors)
        return Transfer(wait=self.finish, done=lambda: self.finished)

    def finish(self):
        self.finished = True


def test_a_window_leaving_holds_no_device_references_once_its_write_backs_are_queued():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(4))
    params = layer_params(model)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tier = LateTier()
    offloaded = OffloadedOptimizer(inner, TensorStateStore(inner, params, tier))
    train(model, offloaded, [[0, 1]])
    leaving = [p for layer in model.model.layers[:2] for p in layer.parameters()]
    window_bytes = sum(8 * p.numel() + 4 for p in leaving)
    references = [weakref.ref(t) for p in leaving for t in inner.state[p].values() if torch.is_tensor(t)]

    offloaded.set_active(units_of(model, [2, 3]))  # the write-backs are queued; none has finished
    gc.collect()
    assert all(reference() is None for reference in references), "the store let go of the leaving window"
    stats = offloaded.store.stats
    assert stats["resident_bytes"] == window_bytes, "until the copies report done, their memory counts"

    tier.finish()  # the copies end during the next forward
    train(model, offloaded, [[2, 3]], seed=2)
    arriving = sum(8 * p.numel() + 4 for layer in model.model.layers[2:] for p in layer.parameters())
    assert stats["resident_bytes"] == arriving
    # The windows were never counted together: the peak is one window being stepped, with its workspace.
    workspace = sum(step_workspace_bytes(inner, p, False) for p in leaving)
    assert stats["peak_resident_bytes"] == window_bytes + workspace


def test_a_unit_being_stepped_holds_its_workspace_inside_the_budget():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(4)).to(torch.bfloat16)
    params = layer_params(model)
    everything = list(model.parameters())
    inner = torch.optim.AdamW(everything, lr=1e-2)
    largest = max(device_bytes_while_stepped(inner, p, True) for p in params)
    budget = 2 * largest
    store = TensorStateStore(inner, params, HostTier(torch.device("cpu")), budget, everything)
    offloaded = OffloadedOptimizer(inner, store, everything)
    during_steps = []
    original = inner.step

    def watched_step(*args, **kwargs):
        stepped = [u for u, e in store._entries.items() if e.workspace]
        during_steps.append((stepped, store.stats["resident_bytes"]))
        return original(*args, **kwargs)

    inner.step = watched_step
    train(model, offloaded, [[0, 1], [0, 1], [2, 3]])
    streamed = [(units, held) for units, held in during_steps if len(units) == 1]
    assert len(streamed) == 3 * 2 * 9, "two layers of 9 tensors do not fit: each tensor is stepped alone"
    for (unit,), held in streamed:
        assert held >= store.unit_bytes(unit) + store.workspace_bytes(unit)
        assert held <= budget
    assert store.stats["peak_resident_bytes"] <= budget
    store.close()


def test_prefetch_goes_as_deep_as_the_budget_holds_the_states_and_the_largest_workspace():
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(4)]
    inner = torch.optim.AdamW(params, foreach=False)
    # Each state: two moments of 16 fp32 elements and a counter (132 bytes); each step's temporaries: 128 bytes.
    budget = 3 * 132 + 128
    store = TensorStateStore(inner, params, HostTier(torch.device("cpu"), [132] * 4), budget)
    offloaded = OffloadedOptimizer(inner, store)
    for p in params:
        p.grad = torch.ones(16)
    offloaded.step()  # streamed: every state is created, stepped and written back
    assert not inner.state and store.stats["resident_tensors"] == 0
    store.prefetch_active()  # before the next step: as deep as the budget allows
    assert store.stats["resident_tensors"] == 3, "three states and one workspace fit; a fourth state does not"
    assert store.stats["resident_bytes"] == store.stats["bytes_to_device"] == 3 * 132
    store.close()


def test_memory_a_write_back_releases_while_the_store_makes_room_is_used():
    """A disk write releases its device memory from the tier's thread, so it can happen between two reads."""
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(2)]
    inner = torch.optim.AdamW(params, foreach=False)
    store = TensorStateStore(inner, params, HostTier(torch.device("cpu"), [132] * 2), max_resident_bytes=300)
    reads = []

    def released():  # held at the first two reads (the residency count, the budget test), released from then on
        reads.append(None)
        return len(reads) > 2

    store._writing[0] = _Entry([], Transfer(done=lambda: False, released=released), 132, "writing")
    assert store._make_room(260, exclude=1), "132 + 260 bytes do not fit in 300, but 260 do once it is released"
    assert len(reads) >= 3
    store.close()
