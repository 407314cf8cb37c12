"""estimate_memory: the formula on a tiny model, a meta-device 7B, and against what a CPU run measures."""

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_grass import GRASSCallback, GRASSStrategy, MemoryEstimate, discover_layers, estimate_memory
from lightning_grass.errors import SettingTypeError, SettingValueError

MODEL = TinyCausalLM().model
TOTAL = sum(p.numel() for p in MODEL.parameters())
LAYER = sum(p.numel() for p in MODEL.model.layers[0].parameters())
ALWAYS_ON = TOTAL - 4 * LAYER  # embeddings, LM head and final norm (not tied)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # fp32: AdamW's two fp32 moments of what one step trains, no masters.
        (dict(n_active=2), (4 * TOTAL, 4 * (ALWAYS_ON + 2 * LAYER), 0, 8 * (ALWAYS_ON + 2 * LAYER))),
        # bf16 weights and gradients; fp32 masters and moments of what one step trains.
        (
            dict(n_active=2, precision="bf16-true"),
            (2 * TOTAL, 2 * (ALWAYS_ON + 2 * LAYER), 4 * (ALWAYS_ON + 2 * LAYER), 8 * (ALWAYS_ON + 2 * LAYER)),
        ),
        # No offload keeps every layer's state once it has been drawn.
        (dict(n_active=2, offload="none"), (4 * TOTAL, 4 * (ALWAYS_ON + 2 * LAYER), 0, 8 * TOTAL)),
        # A budget caps the offloaded states on the device; the always-on modules' stay resident.
        (
            dict(n_active=2, max_resident_bytes=8 * LAYER),
            (4 * TOTAL, 4 * (ALWAYS_ON + 2 * LAYER), 0, 8 * (ALWAYS_ON + LAYER)),
        ),
        (
            dict(n_active=4, offload="none", master_weights=False, precision="bf16-true"),
            (2 * TOTAL, 2 * TOTAL, 0, 4 * TOTAL),
        ),
    ],
    ids=["fp32", "bf16-masters", "no-offload", "budget", "full-bf16-no-masters"],
)
def test_the_estimate_on_a_tiny_model(kwargs, expected):
    estimate = estimate_memory(MODEL, **kwargs)
    assert (estimate.weights, estimate.gradients, estimate.master_weights, estimate.optimizer_states) == expected
    assert estimate.total == sum(expected)


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
    assert estimate.optimizer_states == 8 * (always_on + 2 * layer)
    assert isinstance(estimate, MemoryEstimate) and "total" in str(estimate)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_active=9), r"n_active=9 must be between 1 and the number of layers \(4\)"),
        (dict(n_active=2, precision="16-true"), "precision='16-true' is refused by GRASSStrategy"),
        (dict(n_active=2, offload="nvme"), "offload='nvme' is not supported"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(MODEL, **kwargs)


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


class PeakGradients(Callback):
    def __init__(self):
        self.bytes = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        held = sum(p.grad.numel() * p.grad.element_size() for p in pl_module.parameters() if p.grad is not None)
        self.bytes = max(self.bytes, held)


class PeakStateBetweenSteps(Callback):
    """The offload's resident bytes after each step: states and masters, without the step's own workspace."""

    def __init__(self):
        self.bytes = 0

    def on_train_batch_end(self, trainer, *args):
        self.bytes = max(self.bytes, trainer.strategy.offload_stats["resident_bytes"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_the_estimate_is_within_ten_percent_of_a_measured_cpu_run(precision):
    module = TinyCausalLM(num_layers=8)
    estimate = estimate_memory(module, n_active=2, precision=precision, offload="cpu")
    gradients, states = PeakGradients(), PeakStateBetweenSteps()
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=3, seed=0)
    trainer = make_trainer(
        max_steps=12,
        strategy=GRASSStrategy(offload="cpu"),
        callbacks=[callback, gradients, states],
        precision=precision,
    )
    trainer.fit(module, token_batches())
    measured_state = states.bytes
    assert estimate.weights == sum(p.numel() * p.element_size() for p in module.parameters())
    # The estimate leaves out AdamW's 4-byte step counters.
    assert abs(estimate.optimizer_states + estimate.master_weights - measured_state) <= 0.1 * measured_state
    assert abs(estimate.gradients - gradients.bytes) <= 0.1 * gradients.bytes


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
    assert sharded.optimizer_states == 2 * shard_bytes(always_on + two_blocks)
    assert sharded.master_weights == 0
    assert sharded.gradients < single.gradients and sharded.optimizer_states < single.optimizer_states


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shards": 0}, "shards=0 must be an int >= 1 (the ranks grass_fsdp shards over)"),
        ({"shards": 2, "precision": "bf16-true"}, "precision='bf16-true' is not supported by grass_fsdp (shards=2)"),
        ({"shards": 2, "max_resident_bytes": "1MiB"}, "max_resident_bytes='1MiB' is not supported by grass_fsdp"),
    ],
)
def test_settings_grass_fsdp_does_not_take_are_refused(kwargs, message):
    with pytest.raises(SettingValueError) as raised:
        estimate_memory(MODEL, n_active=2, **kwargs)
    assert str(raised.value).startswith(message)
