"""estimate_memory: the formula on a tiny model, a meta-device 7B, and against what a CPU run measures."""

import re

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_grass import GRASSCallback, GRASSStrategy, MemoryEstimate, discover_layers, estimate_memory
from lightning_grass.errors import SettingTypeError, SettingValueError
from lightning_grass.offload import device_bytes_while_stepped, expected_state_bytes

MODEL = TinyCausalLM().model
TOTAL = sum(p.numel() for p in MODEL.parameters())
LAYER = sum(p.numel() for p in MODEL.model.layers[0].parameters())
ALWAYS_ON = TOTAL - 4 * LAYER  # embeddings, LM head and final norm (not tied)
LARGEST = 32 * 64  # gate_proj, up_proj and down_proj, the largest tensors of a layer
# Tensors, each with a 4-byte AdamW step counter: 3 always-on (embedding, head, norm), 9 per layer.
COUNTERS = 4 * (3 + 2 * 9)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # fp32: AdamW's two fp32 moments and step counter of what one step trains, no masters; the two offloaded
        # layers are stepped together, with foreach AdamW's one fp32 temporary per element.
        (
            dict(n_active=2),
            (4 * TOTAL, 4 * (ALWAYS_ON + 2 * LAYER), 0, 8 * (ALWAYS_ON + 2 * LAYER) + COUNTERS, 4 * 2 * LAYER),
        ),
        # bf16 weights and gradients; fp32 masters and moments of what one step trains; stepping a master adds
        # its fp32 gradient and a temporary: 8 bytes per element.
        (
            dict(n_active=2, precision="bf16-true"),
            (
                2 * TOTAL,
                2 * (ALWAYS_ON + 2 * LAYER),
                4 * (ALWAYS_ON + 2 * LAYER),
                8 * (ALWAYS_ON + 2 * LAYER) + COUNTERS,
                8 * 2 * LAYER,
            ),
        ),
        # No offload keeps every layer's state once it has been drawn, and counts no step workspace.
        (
            dict(n_active=2, offload="none"),
            (4 * TOTAL, 4 * (ALWAYS_ON + 2 * LAYER), 0, 8 * TOTAL + 4 * (3 + 4 * 9), 0),
        ),
        # A budget that holds neither layer while stepped: the tensors stream, prefetched as deep as it allows. At
        # the peak o_proj (32 x 32) is stepped (its state, counter and temporary: 12292 bytes) while the states of
        # gate_proj, up_proj and down_proj (16388 bytes each), both norms (260 each) and the next layer's q_proj
        # (8196) are fetched: 70172 bytes of the 74240; k_proj's 4100 more would pass it. The always-on
        # modules' states stay resident.
        (
            dict(n_active=2, max_resident_bytes=8 * LAYER),
            (
                4 * TOTAL,
                4 * (ALWAYS_ON + 2 * LAYER),
                0,
                8 * ALWAYS_ON + 4 * 3 + 2 * (8 * 1024 + 4) + 3 * (8 * LARGEST + 4) + 2 * (8 * 32 + 4),
                4 * 1024,
            ),
        ),
        (
            dict(n_active=4, offload="none", master_weights=False, precision="bf16-true"),
            (2 * TOTAL, 2 * TOTAL, 0, 4 * TOTAL + 4 * (3 + 4 * 9), 0),
        ),
    ],
    ids=["fp32", "bf16-masters", "no-offload", "budget", "full-bf16-no-masters"],
)
def test_the_estimate_on_a_tiny_model(kwargs, expected):
    estimate = estimate_memory(MODEL, **kwargs)
    parts = (estimate.weights, estimate.gradients, estimate.master_weights, estimate.optimizer_states)
    assert (*parts, estimate.step_workspace) == expected
    assert estimate.total == sum(expected)


def test_the_for_loop_adamw_holds_two_temporaries_per_element():
    estimate = estimate_memory(MODEL, n_active=2, foreach=False)
    assert estimate.step_workspace == 2 * 4 * 2 * LAYER


def test_a_7b_model_is_sized_on_the_meta_device_without_allocating_it():
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    estimate = estimate_memory(model, n_active=2, precision="bf16-true")
    assert estimate.weights == 2 * 6_738_415_616, "LLaMA2-7B's parameter count, in bf16"
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    always_on = 2 * 32000 * 4096 + 4096
    assert estimate.optimizer_states == 8 * (always_on + 2 * layer) + 4 * (3 + 2 * 9)
    assert estimate.step_workspace == 8 * 2 * layer, "an fp32 master gradient and a foreach temporary"
    assert isinstance(estimate, MemoryEstimate) and "step_workspace" in str(estimate) and "total" in str(estimate)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_active=9), r"n_active=9 must be between 1 and the number of layers \(4\)"),
        (dict(n_active=2, precision="16-true"), "precision='16-true' is refused by GRASSStrategy"),
        (dict(n_active=2, offload="nvme"), "offload='nvme' is not supported"),
        (dict(n_active=2, offload="none", max_resident_bytes="1MiB"), "but offload='none' offloads nothing"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(MODEL, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n_active=0), SettingValueError, "n_active=0 must be an integer >= 1"),
        (dict(n_active="2"), SettingTypeError, "n_active='2' must be an integer >= 1"),
        (dict(n_active=True), SettingTypeError, "n_active=True must be an integer >= 1"),
        (dict(n_active=2, shards="2"), SettingTypeError, "shards='2' must be an integer >= 1"),
        (dict(n_active=2, shards=2.0), SettingTypeError, "shards=2.0 must be an integer >= 1"),
        (
            dict(n_active=2, layers=3),
            SettingTypeError,
            "layers=3 must be a dotted module path such as 'model.model.layers', or None",
        ),
        (
            dict(n_active=2, precision="8-true"),
            SettingValueError,
            "precision='8-true' is not supported; use one of "
            "('32-true', '32', 'bf16-mixed', '16-mixed', 'bf16-true', '64-true')",
        ),
    ],
)
def test_settings_are_refused_as_the_callback_and_the_strategies_refuse_them(kwargs, error, message):
    with pytest.raises(error) as raised:
        estimate_memory(MODEL, **kwargs)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            float("nan"),
            SettingTypeError,
            "max_resident_bytes=nan must be a number of bytes or a string such as '512MiB'",
        ),
        (
            "12 parsecs",
            SettingValueError,
            "max_resident_bytes='12 parsecs' is not a byte size; write a number with one of the units B, KB, MB, GB, "
            "TB, KiB, MiB, GiB, TiB, for example '512MiB'",
        ),
    ],
)
def test_a_malformed_max_resident_bytes_is_named_in_one_line(value, error, message):
    with pytest.raises(error) as raised:
        estimate_memory(MODEL, n_active=2, offload="cpu", max_resident_bytes=value)
    assert str(raised.value) == message


def test_a_budget_below_one_row_of_a_tensor_is_refused_with_exact_bytes():
    # Below the largest tensor, tensors stream in chunks of rows; one row of down_proj (its rows are the longest:
    # 64 fp32 elements, two moments and foreach's one temporary, 12 bytes each) and a step counter is the floor.
    with pytest.raises(SettingValueError) as raised:
        estimate_memory(MODEL, n_active=2, max_resident_bytes=771)
    assert str(raised.value) == (
        "max_resident_bytes=771 bytes (771 B) cannot hold model.layers.0.mlp.down_proj.weight while it is stepped "
        "(24580 bytes: its optimizer state and step counter, its fp32 master and master gradient if it has one, and "
        "AdamW's temporaries), nor one row of it (772 bytes), the smallest chunk it is stepped in; raise it to at "
        "least 772 bytes"
    )
    assert estimate_memory(MODEL, n_active=2, max_resident_bytes=24580).step_workspace == 4 * LARGEST
    chunked = estimate_memory(MODEL, n_active=2, max_resident_bytes=772, offload_always_on=True)
    assert chunked.master_weights + chunked.optimizer_states + chunked.step_workspace == 772, "one row at a time"


class PeakGradients(Callback):
    def __init__(self):
        self.bytes = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        held = sum(p.grad.numel() * p.grad.element_size() for p in pl_module.parameters() if p.grad is not None)
        self.bytes = max(self.bytes, held)


def largest_tensor(precision):
    """down_proj's size in the dtype it trains in, and the for-loop AdamW (torch's default on the CPU) over it."""
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    largest = torch.nn.Parameter(torch.empty(LARGEST, dtype=dtype))
    return largest, torch.optim.AdamW([largest], foreach=False), dtype == torch.bfloat16


def smallest_budget(module, precision):
    """The smallest budget the offload works in, as its refusal of one byte less names it."""
    with pytest.raises(SettingValueError) as raised:
        estimate_memory(
            module, n_active=2, precision=precision, foreach=False, max_resident_bytes=1, offload_always_on=True
        )
    match = re.fullmatch(r".*, nor one row of it \((\d+) bytes\), .*; raise it to at least \1 bytes", str(raised.value))
    assert match, str(raised.value)
    return int(match.group(1))


#: Budgets from the smallest allowed to none, in units of down_proj's (the largest tensor's) bytes: chunks of rows
#: below it (every tensor offloaded), then whole tensors streamed with 2 to 5 states fetched ahead, then none.
BUDGETS = {
    "smallest": None,
    "a-third-stepped": lambda stepped, state: stepped // 3,
    "two-states": lambda stepped, state: 2 * state,
    "two-and-a-half-states": lambda stepped, state: 5 * state // 2,
    "two-stepped": lambda stepped, state: 2 * stepped,
    "five-states": lambda stepped, state: 5 * state,
    "none": None,
}


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_the_estimate_is_what_a_cpu_run_measures(precision, budget):
    module = TinyCausalLM(num_layers=6)
    largest, adamw, master = largest_tensor(precision)
    stepped = device_bytes_while_stepped(adamw, largest, master)
    state = expected_state_bytes(adamw, largest, master)
    bytes_ = {"smallest": smallest_budget(module, precision), "none": None}.get(budget)
    if budget not in ("smallest", "none"):
        bytes_ = BUDGETS[budget](stepped, state)
    settings = dict(offload="cpu", max_resident_bytes=bytes_, offload_always_on=bytes_ is not None and bytes_ < stepped)
    estimate = estimate_memory(module, n_active=2, precision=precision, foreach=False, **settings)
    gradients = PeakGradients()
    # A new window at every step: layers leave and join the device between every two updates.
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=1, seed=0)
    trainer = make_trainer(
        max_steps=13, strategy=GRASSStrategy(**settings), callbacks=[callback, gradients], precision=precision
    )
    trainer.fit(module, token_batches())
    # The CPU tier copies synchronously, so a write-back frees its bytes at once, and the store fetches ahead by
    # the plan's own lookahead: what the estimate sums is exactly what the offload held at its peak.
    held = estimate.master_weights + estimate.optimizer_states + estimate.step_workspace
    assert held == trainer.strategy.offload_stats["peak_resident_bytes"]
    assert estimate.gradients == gradients.bytes
    assert estimate.weights == sum(p.numel() * p.element_size() for p in module.parameters())


def test_one_rank_of_grass_fsdp_holds_a_shard_of_everything_plus_the_gathered_groups():
    shards = 4
    single = estimate_memory(MODEL, n_active=2, offload="cpu")
    sharded = estimate_memory(MODEL, n_active=2, offload="cpu", shards=shards)
    layer_map = discover_layers(MODEL)

    def shard_bytes(params):
        return sum(-(-p.numel() // shards) * p.element_size() for p in params)

    layer_params = [list(layer_map.layer_parameters(i)) for i in range(layer_map.num_layers)]
    in_layers = {id(p) for params in layer_params for p in params}
    always_on = [p for p in MODEL.parameters() if id(p) not in in_layers]
    two_blocks = [p for params in layer_params[:2] for p in params]  # the blocks are all the same size
    gathered = sum(p.numel() * p.element_size() for p in always_on + two_blocks)
    assert sharded.weights == shard_bytes(MODEL.parameters()) + gathered
    assert sharded.gradients == shard_bytes(always_on + two_blocks)
    assert sharded.optimizer_states == 2 * shard_bytes(always_on + two_blocks) + 4 * len(always_on + two_blocks)
    # The blocks' offloaded shards are stepped together, each with foreach AdamW's one fp32 temporary per element.
    assert sharded.step_workspace == shard_bytes(two_blocks) and sharded.master_weights == 0
    assert sharded.gradients < single.gradients and sharded.optimizer_states < single.optimizer_states


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shards": 0}, "shards=0 must be an integer >= 1"),
        ({"shards": 2, "precision": "16-mixed"}, "precision='16-mixed' is not supported by grass_fsdp (shards=2)"),
        ({"shards": 2, "max_resident_bytes": 1}, "max_resident_bytes=1 bytes (1 B) cannot hold"),
    ],
)
def test_settings_grass_fsdp_does_not_take_are_refused(kwargs, message):
    with pytest.raises(SettingValueError) as raised:
        estimate_memory(MODEL, n_active=2, **kwargs)
    assert str(raised.value).startswith(message)
