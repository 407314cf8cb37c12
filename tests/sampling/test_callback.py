"""GRASSCallback inside a real Trainer: freezing, probing, MGN, sampling, precision, state, resume."""

import copy
import csv
import itertools
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyCausalLM, make_trainer, tiny_llama_config, token_batches
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from tolerances import fp32_sum_rtol
from transformers import LlamaForCausalLM

from lightning_grass import GRASSCallback
from lightning_grass.errors import SettingValueError
from lightning_grass.sampling.gradient_measurement import LayerGradientMeter

NUM_LAYERS = 4
LAYER_NUMEL = sum(p.numel() for p in TinyCausalLM().model.model.layers[0].parameters())
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
FP16_INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's init_scale


def mgn_rtol(steps: int) -> float:
    """GRASS's float32 MGN against the float64 hand computation of the same gradients.

    The squares of a layer's gradient are summed in float32 over at most all of its elements, the per-parameter
    sums over its parameters, then divided, rooted and averaged over ``steps``; an EMA adds four more roundings.
    """
    return fp32_sum_rtol(LAYER_NUMEL + steps, extra_operations=12)


def layers_of(module):
    return module.model.model.layers


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed_layers(before, module):
    changed = set()
    for i, layer in enumerate(layers_of(module)):
        for name, p in layer.named_parameters():
            if not torch.equal(before[f"model.model.layers.{i}.{name}"], p):
                changed.add(i)
    return changed


def layer_relative_norm(layer) -> float:
    """The layer's gradient norm over its weight norm, with plain Python loops in float64."""
    grad_sq = sum(p.grad.double().square().sum().item() for p in layer.parameters())
    weight_sq = sum(p.detach().double().square().sum().item() for p in layer.parameters())
    return math.sqrt(grad_sq / weight_sq)


def layer_rms(layer) -> float | None:
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    if not grads:
        return None
    numel = sum(p.numel() for p in layer.parameters())
    return math.sqrt(sum(g.double().square().sum().item() for g in grads) / numel)


def reference_probe_mgn(module, loader, steps, accumulate=1, precision="32-true"):
    """MGN by hand: per-step layer gradient RMS of the accumulated gradient, averaged over the steps.

    The gradients are computed as the Trainer computes them (the same kernels on the same batches, under the
    same autocast, with the loss multiplied by the fp16 grad scaler's initial scale and divided out again),
    so they are bitwise the Trainer's, and only the norm's float32 rounding separates the two results.
    """
    module = copy.deepcopy(module)
    batches = iter(loader)
    dtype = AUTOCAST_DTYPES.get(precision)
    scale = FP16_INITIAL_SCALE if precision == "16-mixed" else 1.0
    per_step = []
    for _ in range(steps):
        module.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = module.training_step(next(batches), 0)
            (loss / accumulate * scale).backward()
        per_step.append([layer_rms(layer) / scale for layer in layers_of(module)])
    mgn = torch.tensor(per_step, dtype=torch.float64).mean(0)
    assert torch.isfinite(mgn).all(), "no step overflowed, so the grad scaler kept its initial scale"
    return mgn


class GradSpy(Callback):
    """Records each layer's gradient RMS just before the optimizer step, computed with plain Python loops.

    With ``scaled=True`` (optimizers that unscale inside ``step()``, whose gradients Lightning leaves scaled) the
    RMS is divided by the grad scaler's scale.
    """

    def __init__(self, scaled=False):
        self.steps = []
        self.scaled = scaled

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scale = trainer.precision_plugin.scaler.get_scale() if self.scaled else 1.0
        rms = [layer_rms(layer) for layer in layers_of(pl_module)]
        self.steps.append((trainer.global_step + 1, [None if r is None else r / scale for r in rms]))


def precision_settings(precision):
    """Lightning turns '16-mixed' into bf16 on CPU; an explicit plugin keeps fp16 with a real grad scaler."""
    if precision == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


def fit(module, callback, max_steps, loader=None, **trainer_kwargs):
    trainer = make_trainer(
        max_steps=max_steps, callbacks=[callback, *trainer_kwargs.pop("extra_callbacks", [])], **trainer_kwargs
    )
    trainer.fit(module, loader or token_batches())
    return trainer


class StopAfter(Callback):
    """Ends the fit after optimizer step ``step``, the way an interrupted run ends.

    It stops a run at the end of probing, which ``max_steps`` may not: GRASSCallback refuses a run whose last step
    comes before a step after probing.
    """

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def probe_only(module, callback, probe_steps, **trainer_kwargs):
    """Fit through probing and the first draw at step ``probe_steps``, and no further."""
    extra = [*trainer_kwargs.pop("extra_callbacks", []), StopAfter(probe_steps)]
    return fit(module, callback, max_steps=probe_steps + 1, extra_callbacks=extra, **trainer_kwargs)


def test_probing_updates_nothing_and_frees_block_gradients():
    module = TinyCausalLM(weight_decay=0.1, scheduler=True)
    before = snapshot(module)
    spy = GradSpy()
    trainer = make_trainer(max_steps=4, callbacks=[spy, GRASSCallback(probe_steps=3), StopAfter(3)])
    trainer.fit(module, token_batches())

    assert all(torch.equal(before[name], p) for name, p in module.named_parameters())
    assert trainer.optimizers[0].state == {}
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # the schedule still advanced
    # Block gradients were folded into MGN and freed during backward: none was alive at the optimizer step.
    assert [rms for _, rms in spy.steps] == [[None] * NUM_LAYERS] * 3


@pytest.mark.parametrize("accumulate", [1, 2])
def test_probe_mgn_matches_hand_computation(accumulate):
    module = TinyCausalLM()
    expected = reference_probe_mgn(module, token_batches(), steps=3, accumulate=accumulate)
    callback = GRASSCallback(probe_steps=3)
    probe_only(module, callback, 3, accumulate_grad_batches=accumulate)

    assert callback.phase == "train"
    assert callback.history[0]["step"] == 3
    assert torch.allclose(callback.importance.double(), expected, rtol=mgn_rtol(3), atol=0)
    # float32 probabilities: a sum of 4 terms, each within the softmax's rounding of its exact value.
    assert callback.probabilities.sum().item() == pytest.approx(1.0, rel=fp32_sum_rtol(NUM_LAYERS, extra_operations=8))


def test_refresh_is_ema_of_window_mgn_for_active_layers_only():
    module = TinyCausalLM()
    spy = GradSpy()
    callback = GRASSCallback(probe_steps=2, sample_every=3, ema=0.3, seed=1)
    fit(module, callback, max_steps=5, extra_callbacks=[spy])
    probe, refresh = callback.history
    assert (probe["step"], refresh["step"]) == (2, 5)
    assert refresh["refreshed"] and refresh["resampled"]

    window = [rms for step, rms in spy.steps if 2 < step <= 5]
    for layer in range(NUM_LAYERS):
        seen = [step_rms[layer] for step_rms in window]
        if layer in probe["active_layers"]:
            expected = 0.3 * sum(seen) / len(seen) + 0.7 * probe["importance"][layer]
        else:
            assert seen == [None, None, None], "a frozen layer has no gradient"
            expected = probe["importance"][layer]
        assert refresh["importance"][layer] == pytest.approx(expected, rel=mgn_rtol(3))


def test_frozen_layers_are_bit_identical_and_active_layers_change_over_a_window():
    module = TinyCausalLM(weight_decay=0.1)
    before = snapshot(module)
    callback = GRASSCallback(n_active=2, probe_steps=2, sample_every=4, seed=0)
    fit(module, callback, max_steps=5)

    window_layers = set(callback.history[0]["active_layers"])
    assert len(window_layers) == 2
    assert changed_layers(before, module) == window_layers
    for name in ("model.model.embed_tokens.weight", "model.model.norm.weight", "model.lm_head.weight"):
        assert not torch.equal(before[name], module.get_parameter(name)), f"{name} is always on"


def test_always_on_modules_can_be_frozen():
    module = TinyCausalLM()
    before = snapshot(module)
    callback = GRASSCallback(mode="lisa", train_embeddings=False, train_head=False, train_final_norm=False, seed=0)
    fit(module, callback, max_steps=3)
    for name in ("model.model.embed_tokens.weight", "model.model.norm.weight", "model.lm_head.weight"):
        assert torch.equal(before[name], module.get_parameter(name))
    assert changed_layers(before, module) == set(callback.active_layers)
    assert all(p.requires_grad for p in module.parameters()), "teardown makes every managed parameter trainable again"


def test_sampling_is_deterministic_for_a_seed():
    def run(seed):
        callback = GRASSCallback(mode="lisa", n_active=2, sample_every=1, seed=seed)
        fit(TinyCausalLM(), callback, max_steps=8)
        return [record["active_layers"] for record in callback.history]

    first = run(3)
    assert len(first) == 9
    assert first == run(3)
    assert first != run(4)


def test_seed_none_follows_seed_everything():
    def run():
        pl.seed_everything(11, verbose=False)
        callback = GRASSCallback(mode="lisa", sample_every=1)
        fit(TinyCausalLM(), callback, max_steps=6)
        return [record["active_layers"] for record in callback.history]

    assert run() == run()


def test_resampling_happens_on_optimizer_steps_not_micro_batches():
    callback = GRASSCallback(mode="lisa", sample_every=2, seed=0)
    trainer = fit(TinyCausalLM(), callback, max_steps=6, accumulate_grad_batches=2)
    assert trainer.global_step == 6
    assert [record["step"] for record in callback.history] == [0, 2, 4, 6]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_probes_and_trains(precision):
    module = TinyCausalLM()
    before = snapshot(module)
    expected = reference_probe_mgn(module, token_batches(), steps=3, precision=precision)
    callback = GRASSCallback(probe_steps=3, sample_every=2, seed=0)
    probe_only(module, callback, 3, **precision_settings(precision))
    assert all(torch.equal(before[name], p) for name, p in module.named_parameters())
    # The same autocast gradients, unscaled: only the float32 norm's rounding separates MGN from the reference.
    assert torch.allclose(callback.importance.double(), expected, rtol=mgn_rtol(3), atol=0)

    fit(module, callback, max_steps=4, **precision_settings(precision))
    assert [record["step"] for record in callback.history] == [3, 5, 7]
    assert changed_layers(before, module)
    assert torch.isfinite(callback.importance).all()


def test_fused_optimizer_under_fp16_gives_unscaled_mgn():
    """Lightning leaves gradients scaled for optimizers that unscale in step(); MGN must divide the scale out."""

    def run(optimizer):
        spy = GradSpy(scaled=optimizer == "fused_adamw")
        callback = GRASSCallback(probe_steps=2, sample_every=2, seed=0)
        fit(
            TinyCausalLM(optimizer=optimizer),
            callback,
            max_steps=6,
            extra_callbacks=[spy],
            **precision_settings("16-mixed"),
        )
        return callback.history, spy.steps

    (fused, fused_steps), (plain, _) = run("fused_adamw"), run("adamw")
    assert [record["step"] for record in fused] == [2, 4, 6]
    # Probing changes no weight, so both runs probe the same scaled gradients, and the scale is a power of two,
    # divided out exactly: the probe MGN is bitwise the same.
    assert fused[0]["importance"] == plain[0]["importance"]
    # After probing the two optimizers' arithmetic differs. Each fused refresh is the EMA of its own window's
    # gradient RMS, unscaled.
    for previous, record in itertools.pairwise(fused):
        window = [rms for step, rms in fused_steps if previous["step"] < step <= record["step"]]
        for layer in previous["active_layers"]:
            seen = [step_rms[layer] for step_rms in window]
            expected = 0.5 * sum(seen) / len(seen) + 0.5 * previous["importance"][layer]
            assert record["importance"][layer] == pytest.approx(expected, rel=mgn_rtol(2))


class InjectInf(Callback):
    """Makes one gradient element infinite at a chosen optimizer step, after backward."""

    def __init__(self, step, parameter=lambda module: module.model.lm_head.weight):
        self.step, self.parameter = step, parameter

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            self.parameter(pl_module).grad.view(-1)[0] = float("inf")


def test_a_step_with_a_non_finite_layer_gradient_contributes_nothing():
    # A probe-only run tells which layers the first window trains (same model, data and seed).
    first_window = GRASSCallback(probe_steps=1, seed=0)
    probe_only(TinyCausalLM(), first_window, 1)
    broken = first_window.active_layers[0]

    spy = GradSpy()
    inject = InjectInf(step=3, parameter=lambda module: layers_of(module)[broken].mlp.down_proj.weight)
    callback = GRASSCallback(probe_steps=1, sample_every=3, ema=0.5, seed=0)
    # The spy reads the gradients before GRASS drops those of the skipped step.
    make_trainer(max_steps=4, callbacks=[spy, inject, callback]).fit(TinyCausalLM(), token_batches())

    probe, refresh = callback.history
    assert probe["active_layers"] == first_window.active_layers
    assert math.isinf(spy.steps[3][1][broken]), "step 4 carried the infinite gradient"
    for layer in probe["active_layers"]:
        kept = [spy.steps[1][1][layer], spy.steps[2][1][layer]]  # steps 2 and 3; step 4 is left out
        expected = 0.5 * sum(kept) / 2 + 0.5 * probe["importance"][layer]
        assert refresh["importance"][layer] == pytest.approx(expected, rel=mgn_rtol(2))


def test_a_step_the_grad_scaler_skips_contributes_nothing():
    scales = []

    class RecordScale(Callback):
        def on_train_batch_end(self, trainer, *args):
            scales.append(trainer.precision_plugin.scaler.get_scale())

    spy = GradSpy()
    callback = GRASSCallback(probe_steps=1, sample_every=2, ema=0.5, seed=0)
    extra = [spy, InjectInf(step=2), RecordScale()]
    fit(TinyCausalLM(), callback, max_steps=3, extra_callbacks=extra, **precision_settings("16-mixed"))
    assert scales[2] == scales[1] / 2, "the scaler saw the inf at step 3 and skipped it"

    probe, refresh = callback.history
    step_2 = spy.steps[1][1]
    for layer in range(NUM_LAYERS):
        expected = probe["importance"][layer]
        if layer in probe["active_layers"]:
            expected = 0.5 * step_2[layer] + 0.5 * expected  # step 3 is not in the window mean
        assert refresh["importance"][layer] == pytest.approx(expected, rel=mgn_rtol(1))


def test_gradient_clipping_leaves_mgn_unclipped():
    module = TinyCausalLM()
    expected = reference_probe_mgn(module, token_batches(), steps=2)
    callback = GRASSCallback(probe_steps=2, sample_every=2, seed=0)
    before = snapshot(module)
    fit(module, callback, max_steps=4, gradient_clip_val=1e-3)
    probe_mgn = torch.tensor(callback.history[0]["importance"], dtype=torch.float64)
    assert torch.allclose(probe_mgn, expected, rtol=mgn_rtol(2), atol=0)
    assert changed_layers(before, module) == set(callback.history[0]["active_layers"])


def test_gradient_checkpointing_with_frozen_leading_layers():
    module = TinyCausalLM()
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = snapshot(module)
    fit(module, GRASSCallback(mode="fixed", fixed_layers=[2, 3]), max_steps=3)
    assert changed_layers(before, module) == {2, 3}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizer_holds_state_only_for_active_and_always_on_parameters(optimizer):
    module = TinyCausalLM(optimizer=optimizer)
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=2, seed=2)
    trainer = fit(module, callback, max_steps=9)
    assert len({tuple(r["active_layers"]) for r in callback.history}) > 2, "several different active sets were drawn"

    active = {id(p) for i in callback.active_layers for p in layers_of(module)[i].parameters()}
    always_on = {
        id(p)
        for p in (module.model.model.embed_tokens.weight, module.model.model.norm.weight, module.model.lm_head.weight)
    }
    assert {id(p) for p in trainer.optimizers[0].state} == active | always_on


def test_peft_base_weights_stay_frozen():
    peft = pytest.importorskip("peft", reason="peft is installed by the dev extra")
    module = TinyCausalLM()
    module.model = peft.get_peft_model(module.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(module)
    callback = GRASSCallback(mode="lisa", n_active=1, sample_every=3, seed=0)
    fit(module, callback, max_steps=3)
    changed = {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}
    (layer,) = callback.active_layers
    assert changed and all("lora_" in name and f"layers.{layer}." in name for name in changed)
    assert callback.layer_map.path == "model.base_model.model.model.layers"


def test_optimizer_missing_layer_parameters_is_refused():
    class PartialOptimizer(TinyCausalLM):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.model.layers[0].parameters())

    with pytest.raises(
        SettingValueError,
        match=r"does not hold 30 trainable parameters .*embed_tokens.weight.*AdamW\(self.parameters\(\)\)",
    ):
        fit(PartialOptimizer(), GRASSCallback(), max_steps=1)


def test_two_callbacks_are_refused_when_the_trainer_is_built():
    with pytest.raises(RuntimeError, match="Found more than one stateful callback of type `GRASSCallback`"):
        make_trainer(max_steps=1, callbacks=[GRASSCallback(), GRASSCallback(mode="lisa")])


def test_n_active_larger_than_the_model_is_refused_before_training():
    module = TinyCausalLM()
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"n_active=5 must be between 1 and the number of layers \(4\)"):
        fit(module, GRASSCallback(n_active=5), max_steps=1)
    assert all(torch.equal(before[name], p) for name, p in module.named_parameters())


def test_resample_and_refresh_records_go_to_the_loggers(tmp_path):
    callback = GRASSCallback(probe_steps=2, sample_every=2, seed=0)
    fit(TinyCausalLM(), callback, max_steps=6, logger=CSVLogger(tmp_path, name="run"))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as metrics:
        rows = list(csv.DictReader(metrics))
    logged = {int(row["step"]): row for row in rows if row.get("grass/importance/layer_00")}
    assert sorted(logged) == [record["step"] for record in callback.history] == [2, 4, 6]
    for record in callback.history:
        row = logged[record["step"]]
        for layer in range(NUM_LAYERS):
            # The CSV holds the repr of the same Python float, which reads back exactly.
            assert float(row[f"grass/importance/layer_{layer:02d}"]) == record["importance"][layer]
            assert float(row[f"grass/probability/layer_{layer:02d}"]) == record["probabilities"][layer]
            assert float(row[f"grass/active/layer_{layer:02d}"]) == float(layer in record["active_layers"])


def _train(max_steps, checkpoint_dir=None, resume_from=None):
    module = TinyCausalLM(weight_decay=0.1)
    callback = GRASSCallback(probe_steps=4, sample_every=3, update_every=2, seed=0)
    callbacks = [callback]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(checkpoint_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = make_trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=checkpoint_dir is not None)
    # One batch per epoch: every step ends an epoch, where a plain DataLoader resumes exactly.
    trainer.fit(module, token_batches(num_batches=1), ckpt_path=resume_from)
    return module, callback, trainer


@pytest.mark.parametrize(
    "interrupt_at", [3, 4, 6, 7], ids=["while-probing", "at-probe-end", "mid-window", "at-window-boundary"]
)
def test_resume_is_bit_exact(tmp_path, interrupt_at):
    full_module, full_callback, full_trainer = _train(12, checkpoint_dir=tmp_path)
    module, callback, trainer = _train(12, resume_from=tmp_path / f"step={interrupt_at}.ckpt")

    assert trainer.global_step == full_trainer.global_step == 12
    for name, p in full_module.named_parameters():
        assert torch.equal(p, module.get_parameter(name)), name
    assert callback.history == full_callback.history
    assert [r["step"] for r in callback.history] == [4, 6, 7, 8, 10, 12]
    assert torch.equal(callback.importance, full_callback.importance)
    assert callback.active_layers == full_callback.active_layers
    full_state = full_trainer.optimizers[0].state_dict()["state"]
    state = trainer.optimizers[0].state_dict()["state"]
    assert full_state.keys() == state.keys()
    for key in full_state:
        assert all(torch.equal(full_state[key][k], state[key][k]) for k in full_state[key]), key


def test_a_non_finite_layer_gradient_skips_the_step_with_a_warning_and_training_goes_on():
    first_window = GRASSCallback(probe_steps=1, seed=0)
    probe_only(TinyCausalLM(), first_window, 1)
    broken = first_window.active_layers[0]

    snapshots = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step] = snapshot(pl_module)

    module = TinyCausalLM()
    inject = InjectInf(step=2, parameter=lambda m: layers_of(m)[broken].mlp.down_proj.weight)
    callback = GRASSCallback(probe_steps=1, sample_every=3, seed=0)
    with pytest.warns(UserWarning, match=rf"optimizer step 3 has non-finite gradients in layers \[{broken}\]"):
        fit(module, callback, max_steps=6, extra_callbacks=[inject, Snapshot()])

    assert all(torch.equal(snapshots[2][name], snapshots[3][name]) for name in snapshots[2]), "step 3 changed nothing"
    assert changed_layers(snapshots[3], module), "training went on after the skipped step"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(math.isfinite(v) for record in callback.history for v in record["importance"])


def test_bf16_layers_under_a_strategy_without_masters_get_a_warning():
    module = TinyCausalLM()
    callback = GRASSCallback(mode="lisa", seed=0)
    with pytest.warns(UserWarning, match=r"layer parameters are torch.bfloat16 and SingleDeviceStrategy steps them"):
        fit(module, callback, max_steps=1, precision="bf16-true")


def test_history_records_the_effective_number_of_layers_and_each_layers_share_of_draws(tmp_path):
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=1, seed=0)
    fit(TinyCausalLM(), callback, max_steps=5, logger=CSVLogger(tmp_path, name="run"))
    counts = [0] * NUM_LAYERS
    for record in callback.history:
        for layer in record["active_layers"]:
            counts[layer] += 1
        assert record["draw_share"] == [c / sum(counts) for c in counts], "shares of every draw up to this record"
        assert record["effective_layers"] == pytest.approx(NUM_LAYERS, rel=1e-6), "LISA is uniform"
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as metrics:
        rows = [row for row in csv.DictReader(metrics) if row.get("grass/effective_layers")]
    assert len(rows) == len(callback.history) == 6
    assert float(rows[-1]["grass/draw_share/layer_00"]) == callback.history[-1]["draw_share"][0]


def test_relative_importance_is_the_gradient_norm_over_the_weight_norm():
    module = TinyCausalLM()
    reference, batches = copy.deepcopy(module), iter(token_batches())
    per_step = []
    for _ in range(3):
        reference.zero_grad(set_to_none=True)
        reference.training_step(next(batches), 0).backward()
        per_step.append([layer_relative_norm(layer) for layer in layers_of(reference)])
    expected = torch.tensor(per_step, dtype=torch.float64).mean(0)
    callback = GRASSCallback(probe_steps=3, importance="relative")
    probe_only(module, callback, 3)
    # Two float32 sums over at most a layer's elements (gradient and weight), then the division, root and mean.
    rtol = fp32_sum_rtol(2 * LAYER_NUMEL + 3, extra_operations=12)
    assert torch.allclose(callback.importance.double(), expected, rtol=rtol, atol=0)


def test_a_target_effective_number_of_layers_spreads_the_probabilities():
    callback = GRASSCallback(probe_steps=2, sample_every=2, target_effective_layers=3.0, seed=0)
    fit(TinyCausalLM(), callback, max_steps=6)
    assert all(record["effective_layers"] == pytest.approx(3.0, rel=1e-5) for record in callback.history)


def test_under_a_grad_scaler_the_skip_is_the_scalers_own_and_read_with_the_window(monkeypatch):
    def no_host_read(*args, **kwargs):
        raise AssertionError("skip_if_non_finite reads a boolean on the host; under a grad scaler it is not needed")

    monkeypatch.setattr(LayerGradientMeter, "skip_if_non_finite", no_host_read)
    reads = []
    original = LayerGradientMeter.read_scaled_skips

    def counted(self):
        reads.append(len(self._scaled_steps))
        return original(self)

    monkeypatch.setattr(LayerGradientMeter, "read_scaled_skips", counted)
    snapshots = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step] = snapshot(pl_module)

    module = TinyCausalLM()
    callback = GRASSCallback(mode="lisa", n_active=2, sample_every=3, seed=0)
    inject = InjectInf(step=4, parameter=lambda m: layers_of(m)[callback.active_layers[0]].mlp.down_proj.weight)
    with pytest.warns(UserWarning, match=r"optimizer step 5 has non-finite gradients in layers \[\d\]"):
        fit(module, callback, max_steps=7, extra_callbacks=[inject, Snapshot()], **precision_settings("16-mixed"))
    assert callback.skipped_steps == [5]
    assert all(torch.equal(snapshots[4][name], snapshots[5][name]) for name in snapshots[4]), "the scaler skipped it"
    # Read when the windows closed (after steps 3 and 6) and at teardown: three reads for seven steps.
    assert reads == [3, 3, 1]


class TrainableSpy(Callback):
    """The number of parameters that require grad at each optimizer step after probing."""

    def __init__(self, grass):
        self.grass, self.counts = grass, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grass.phase == "train":
            self.counts.append(sum(p.numel() for p in pl_module.parameters() if p.requires_grad))


# The tiny Llama: a layer holds 9,280 parameters, the token embedding 2,048, the head 2,048 (one tensor with the
# embedding when tied) and the final norm 32. Two layers train at a time.
@pytest.mark.parametrize(
    ("tied", "train_embeddings", "train_head", "expected"),
    [
        (False, True, True, 2 * 9280 + 2048 + 2048 + 32),
        (False, True, False, 2 * 9280 + 2048 + 32),
        (False, False, True, 2 * 9280 + 2048 + 32),
        (False, False, False, 2 * 9280 + 32),
        (True, True, True, 2 * 9280 + 2048 + 32),
        (True, True, False, 2 * 9280 + 2048 + 32),
        (True, False, True, 2 * 9280 + 32),
        (True, False, False, 2 * 9280 + 32),
    ],
)
def test_trainable_parameters_per_step_counts_what_requires_grad_at_a_training_step(
    tied, train_embeddings, train_head, expected
):
    module = TinyCausalLM()
    if tied:
        module.model = LlamaForCausalLM(tiny_llama_config(NUM_LAYERS, tie_word_embeddings=True))
        module.model.tie_weights()
    callback = GRASSCallback(
        n_active=2, probe_steps=2, sample_every=2, seed=0, train_embeddings=train_embeddings, train_head=train_head
    )
    assert callback.trainable_parameters_per_step() == 0, "nothing trained before fit"
    spy = TrainableSpy(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tied head whose setting disagrees with train_embeddings is warned about
        fit(module, callback, max_steps=6, extra_callbacks=[spy])
    assert spy.counts == [expected] * 4
    assert callback.trainable_parameters_per_step() == expected


def test_trainable_parameters_per_step_is_the_largest_window_drawn_not_the_largest_layers():
    module = TinyCausalLM()
    layers_of(module)[0].mlp.requires_grad_(False)  # 6,144 of layer 0's 9,280 parameters, frozen by the user
    callback = GRASSCallback(mode="fixed", fixed_layers=[0, 1])
    spy = TrainableSpy(callback)
    fit(module, callback, max_steps=2, extra_callbacks=[spy])
    expected = (9280 - 6144) + 9280 + 2048 + 2048 + 32
    assert spy.counts == [expected] * 2
    assert callback.trainable_parameters_per_step() == expected


def test_trainable_parameters_per_step_is_0_when_the_run_ended_while_probing():
    callback = GRASSCallback(probe_steps=3, sample_every=2, seed=0)
    probe_only(TinyCausalLM(), callback, 3)
    assert [(record["step"], record["trained"]) for record in callback.history] == [(3, False)]
    assert callback.trainable_parameters_per_step() == 0
