"""GRASSCallback(unit="module"): the same method over the weight matrices inside the layers, under the parameter
budget of n_active layers."""

import copy
import math
import warnings

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_callback import StopAfter, fit, layers_of
from tolerances import fp32_sum_rtol

from lightning_grass import GRASSCallback, GRASSStrategy, estimate_memory
from lightning_grass.errors import SettingValueError

# TinyCausalLM's layer: q and o 32 x 32, k and v 16 x 32 (2 of 4 heads), gate, up and down 64 x 32, two norms of 32.
MODULE_SIZES = [1024, 512, 512, 1024, 2048, 2048, 2048]
LAYER_SIZE = sum(MODULE_SIZES) + 2 * 32
NUM_LAYERS = 4
ALWAYS_ON = 64 * 32 * 2 + 32  # embeddings, the untied head, the final norm


MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
MODULES += ("mlp.up_proj", "mlp.down_proj")


def module_names(layer):
    return [f"{layer}.{name}" for name in MODULES]


class WindowRecorder(Callback):
    """Before each optimizer step, the active units; after it, the names of the parameters the step changed."""

    def __init__(self, grass):
        self.grass = grass
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.before = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.active = list(self.grass.active_units)

    def on_train_batch_end(self, trainer, pl_module, *args):
        changed = {name for name, p in pl_module.named_parameters() if not torch.equal(self.before[name], p)}
        self.steps.append((self.active, changed))


def unit_parameter_names(module, grass, units):
    by_id = {id(p): name for name, p in module.named_parameters()}
    return {by_id[id(p)] for unit in units for p in grass.units.parameters[unit]}


@pytest.mark.parametrize("mode", ["grass", "grass_static", "lisa"])
def test_a_module_window_trains_exactly_the_drawn_modules_within_the_budget_of_n_active_layers(mode):
    module = TinyCausalLM(weight_decay=0.1)  # weight decay moves every parameter that the optimizer steps
    grass = GRASSCallback(mode=mode, unit="module", n_active=2, probe_steps=2, sample_every=2, seed=0)
    recorder = WindowRecorder(grass)
    fit(module, grass, max_steps=12, extra_callbacks=[recorder])

    assert grass.units.names == tuple(name for layer in range(NUM_LAYERS) for name in module_names(layer))
    assert grass.parameter_budget == 2 * LAYER_SIZE == 18_560
    always_on = {"model.model.embed_tokens.weight", "model.lm_head.weight", "model.model.norm.weight"}
    probe_steps = 2 if mode != "lisa" else 0
    trained_windows = 0
    for step, (active, changed) in enumerate(recorder.steps, start=1):
        if step <= probe_steps:
            assert changed == set(), "probing updates nothing"
            continue
        assert changed == unit_parameter_names(module, grass, active) | always_on, f"step {step}"
        trained_windows += 1
    assert trained_windows == 12 - probe_steps
    norms = [name for name, _ in module.named_parameters() if "layernorm" in name]
    assert len(norms) == 2 * NUM_LAYERS and not any(norm in changed for _, changed in recorder.steps for norm in norms)

    draws = [record for record in grass.history if record["resampled"]]
    assert len(draws) == (7 if mode == "lisa" else 6), "LISA draws at step 0, the others when probing ends"
    for record in draws:
        held = sum(MODULE_SIZES[unit % 7] for unit in record["active_units"])
        left = [MODULE_SIZES[unit % 7] for unit in range(28) if unit not in record["active_units"]]
        assert held <= grass.parameter_budget and min(left) > grass.parameter_budget - held, record
        assert record["active_layers"] == sorted({unit // 7 for unit in record["active_units"]})
    windows = [sum(MODULE_SIZES[u % 7] for u in r["active_units"]) for r in draws if r["trained"]]
    assert grass.trainable_parameters_per_step() == ALWAYS_ON + max(windows)
    assert all(p.requires_grad for p in module.parameters()), "every parameter trainable again after fit"


def reference_module_mgn(module, loader, steps):
    """Each module's gradient RMS per step, averaged over the steps, in float64 with plain loops."""
    module = copy.deepcopy(module)
    batches = iter(loader)
    per_step = []
    for _ in range(steps):
        module.zero_grad(set_to_none=True)
        module.training_step(next(batches), 0).backward()
        row = []
        for layer in layers_of(module):
            for part in (layer.self_attn, layer.mlp):
                for name, child in part.named_children():
                    if name.endswith("_proj"):
                        grad = child.weight.grad.double()
                        row.append(math.sqrt(grad.square().sum().item() / grad.numel()))
        per_step.append(row)
    return torch.tensor(per_step, dtype=torch.float64).mean(0)


def test_probing_measures_every_modules_mgn_and_the_ema_refreshes_the_active_ones_only():
    module = TinyCausalLM()
    expected = reference_module_mgn(module, token_batches(), steps=3)
    grass = GRASSCallback(unit="module", probe_steps=3, sample_every=2, ema=0.5, seed=0)
    fit(module, grass, max_steps=5, extra_callbacks=[StopAfter(5)])

    first, refresh = grass.history[0], grass.history[1]
    # float32 sums over at most a module's 2,048 elements, then a division, a root and the mean of 3 steps.
    rtol = fp32_sum_rtol(2048 + 3, extra_operations=8)
    assert torch.allclose(torch.tensor(first["importance"], dtype=torch.float64), expected, rtol=rtol, atol=0)
    stale = [u for u in range(28) if u not in first["active_units"]]
    assert [refresh["importance"][u] for u in stale] == [first["importance"][u] for u in stale]
    assert all(refresh["importance"][u] != first["importance"][u] for u in first["active_units"])


def test_a_target_effective_number_counts_modules_and_fixed_takes_layers_only():
    module = TinyCausalLM()
    grass = GRASSCallback(unit="module", probe_steps=1, sample_every=1, target_effective_layers=20, seed=0)
    fit(module, grass, max_steps=3)
    assert grass.history[-1]["effective_layers"] == pytest.approx(20, rel=1e-3)
    with pytest.raises(SettingValueError, match=r"target_effective_layers=29 must be between 1 and the number of "):
        fit(TinyCausalLM(), GRASSCallback(unit="module", target_effective_layers=29), max_steps=30)
    with pytest.raises(SettingValueError, match=r"unit='module' with mode='fixed': fixed_layers names whole layers"):
        GRASSCallback(mode="fixed", unit="module", fixed_layers=[0])
    with pytest.raises(SettingValueError, match=r"^unit='modules' is not supported; use one of \('layer', 'module'\)$"):
        GRASSCallback(unit="modules")


def train_with_checkpoints(tmp_path, max_steps, resume_from=None, strategy="auto"):
    module = TinyCausalLM(weight_decay=0.1)
    grass = GRASSCallback(unit="module", probe_steps=3, sample_every=2, seed=0)
    every_step = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(
        max_steps=max_steps, callbacks=[grass, every_step], enable_checkpointing=True, strategy=strategy
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, token_batches(num_batches=1), ckpt_path=resume_from)
    return module, grass


@pytest.mark.parametrize("strategy", ["auto", "grass"])
@pytest.mark.parametrize("interrupt_at", [2, 6], ids=["while-probing", "mid-window"])
def test_a_resumed_module_run_draws_the_same_modules_and_ends_bit_identical(tmp_path, interrupt_at, strategy):
    full, full_grass = train_with_checkpoints(tmp_path / "full", 11, strategy=strategy)
    resumed, grass = train_with_checkpoints(
        tmp_path / "resumed", 11, resume_from=tmp_path / "full" / f"step={interrupt_at}.ckpt", strategy=strategy
    )
    assert [r["active_units"] for r in grass.history] == [r["active_units"] for r in full_grass.history]
    assert grass.history == full_grass.history and len(grass.history) == 5
    for name, p in full.named_parameters():
        assert torch.equal(p, resumed.get_parameter(name)), name


def test_resuming_a_module_checkpoint_with_layers_is_refused(tmp_path):
    train_with_checkpoints(tmp_path, 4)
    checkpoint = torch.load(tmp_path / "step=4.ckpt", weights_only=False)
    with pytest.raises(SettingValueError) as refused:
        GRASSCallback(unit="layer").load_state_dict(checkpoint["callbacks"]["GRASSCallback"])
    assert str(refused.value) == (
        "the checkpoint was written by GRASSCallback(unit='module'), this one has unit='layer'; resume with the same "
        "unit (the importance, draws and history index its units)"
    )


def test_offloaded_module_states_stream_under_a_budget_and_train_as_when_every_state_stays():
    """The store keeps each drawn module's AdamW state and moves it off the device when the module leaves."""
    runs = {}
    for offload, budget in (("none", None), ("cpu", "24KiB"), ("cpu", None)):
        module = TinyCausalLM(weight_decay=0.1)
        grass = GRASSCallback(unit="module", probe_steps=2, sample_every=2, seed=0)
        strategy = GRASSStrategy(offload=offload, max_resident_bytes=budget)
        fit(module, grass, max_steps=10, strategy=strategy)
        runs[offload, budget] = (module, grass, strategy.offload_stats)
    kept, kept_grass, _ = runs["none", None]
    for offloaded, grass, _ in (runs["cpu", "24KiB"], runs["cpu", None]):
        assert grass.history == kept_grass.history
        for name, p in kept.named_parameters():
            assert torch.equal(p, offloaded.get_parameter(name)), name
    # AdamW's two moments, in float32, of the always-on parameters the store does not hold, beside the budget.
    streamed = runs["cpu", "24KiB"][2]
    assert streamed["peak_resident_bytes"] <= 24 * 2**10 + 8 * ALWAYS_ON and streamed["bytes_to_device"] > 0
    # Without a budget the drawn modules' states stay, and hold less than n_active layers' would.
    estimate = estimate_memory(TinyCausalLM().model, n_active=2, offload="cpu", foreach=False)  # as on the CPU
    layer_wise = estimate.optimizer_states + estimate.master_weights + estimate.step_workspace
    # AdamW's two float32 moments of two layers and the always-on modules, and a 4-byte step count per tensor.
    assert estimate.optimizer_states == 8 * (2 * LAYER_SIZE + ALWAYS_ON) + 4 * (2 * 9 + 3)
    assert 8 * ALWAYS_ON < runs["cpu", None][2]["peak_resident_bytes"] <= layer_wise
