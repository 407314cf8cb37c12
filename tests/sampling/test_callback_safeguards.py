"""GRASSCallback against runs that would train nothing, or not what was asked, without saying so.

Layers frozen before fit, no gradient reaching the layers, a max_steps shorter than probing, non-finite steps, and
a resume with changed settings; each in a real Trainer on the tiny Llama of conftest.
"""

import re
import warnings

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, tiny_llama_config, token_batches
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaForCausalLM

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.errors import NothingToTrainError, SettingValueError

NUM_LAYERS = 4


def layers_of(module):
    return module.model.model.layers


def freeze_layers(module, indices):
    for index in indices:
        layers_of(module)[index].requires_grad_(False)
    return module


def fit_recording_warnings(callback, max_steps, module=None, **trainer_kwargs):
    """Fit, and return the text of every warning that starts with ``GRASS:``, in order."""
    module = module or TinyCausalLM()
    loader = trainer_kwargs.pop("loader", None) or token_batches()
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    trainer = make_trainer(max_steps=max_steps, callbacks=[callback, *trainer_kwargs.pop("extra_callbacks", [])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return [str(w.message) for w in caught if str(w.message).startswith("GRASS:")], trainer


class RecordingStrategy(GRASSStrategy):
    """GRASSStrategy that records what the callback tells it through ActiveLayerListener."""

    def __init__(self):
        super().__init__(offload="cpu")
        self.active_calls = []

    def on_active_units(self, active_units):
        self.active_calls.append(list(active_units))
        super().on_active_units(active_units)


@pytest.mark.parametrize("mode", ["grass", "grass_static", "lisa"])
def test_a_layer_frozen_before_fit_is_never_probed_or_drawn(mode):
    module = freeze_layers(TinyCausalLM(), [1])
    frozen_before = [p.detach().clone() for p in layers_of(module)[1].parameters()]
    strategy = RecordingStrategy()
    callback = GRASSCallback(mode=mode, n_active=2, probe_steps=2, sample_every=1, seed=0)
    trainer = make_trainer(max_steps=10, callbacks=[callback], strategy=strategy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, token_batches())

    notices = [str(w.message) for w in caught if "no parameter that requires grad" in str(w.message)]
    assert notices == [
        "GRASS: layers [1] have no parameter that requires grad (frozen before fit); they are left out of probing "
        "and sampling, and n_active=2 is drawn from the other 3 layers"
    ]
    if mode != "lisa":
        assert strategy.active_calls[0] == [0, 2, 3], "probing measures the trainable layers, in the model's indices"
    assert all(1 not in call for call in strategy.active_calls)
    assert len(callback.history) == (11 if mode == "lisa" else 9), "lisa draws at step 0, GRASS after 2 probe steps"
    for record in callback.history:
        assert 1 not in record["active_layers"] and len(record["active_layers"]) == 2
        assert record["probabilities"][1] == 0.0
        assert record["draw_share"][1] == 0.0
        assert min(record["probabilities"][i] for i in (0, 2, 3)) > 0
        if mode == "lisa":
            assert record["importance"] is None
            assert record["effective_layers"] == pytest.approx(3.0, rel=1e-6), "uniform over the 3 trainable layers"
        else:
            assert record["importance"][1] == 0.0
            assert all(record["importance"][i] > 0 for i in (0, 2, 3))
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, layers_of(module)[1].parameters(), strict=True))
    assert not any(p.requires_grad for p in layers_of(module)[1].parameters()), "a user-frozen layer stays frozen"


def test_n_active_is_checked_against_the_trainable_layers():
    module = freeze_layers(TinyCausalLM(), [1, 2])
    with pytest.raises(
        SettingValueError,
        match=r"^n_active=3 must be between 1 and the number of trainable layers \(2; layers \[1, 2\] have no "
        r"parameter that requires grad\)$",
    ):
        fit_recording_warnings(GRASSCallback(n_active=3), max_steps=1, module=module)


def test_a_fixed_layer_without_trainable_parameters_is_refused_at_fit_start():
    module = freeze_layers(TinyCausalLM(), [2])
    with pytest.raises(SettingValueError, match=r"^fixed_layers=\[1, 2\] names layers \[2\], which have no parameter"):
        fit_recording_warnings(GRASSCallback(mode="fixed", fixed_layers=[1, 2]), max_steps=1, module=module)


def test_a_model_whose_layers_are_all_frozen_is_refused_in_one_line():
    module = freeze_layers(TinyCausalLM(), range(NUM_LAYERS))
    with pytest.raises(
        SettingValueError, match=r"^no layer at 'model.model.layers' has a parameter that requires grad"
    ):
        fit_recording_warnings(GRASSCallback(mode="lisa"), max_steps=1, module=module)


def test_two_optimizers_are_refused_in_one_line():
    class TwoOptimizers(TinyCausalLM):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            model = self.model
            return [torch.optim.SGD(model.model.parameters(), lr=0.1), torch.optim.SGD([model.lm_head.weight], lr=0.1)]

    with pytest.raises(SettingValueError, match=r"^GRASSCallback needs exactly one optimizer, got 2"):
        fit_recording_warnings(GRASSCallback(mode="lisa"), max_steps=1, module=TwoOptimizers())


def reentrant_checkpointing_without_input_grads():
    """The transformers 4.x default for a model without peft: reentrant checkpointing, no input gradients.

    transformers 5 defaults to use_reentrant=False and turns input gradients on, so both are set back here.
    """
    module = TinyCausalLM()
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    module.model.disable_input_require_grads()
    return module


@pytest.mark.parametrize(
    ("mode", "stopped_at", "where"),
    [
        ("grass", 3, r"\[0, 1, 2, 3\] in probing \(optimizer steps 1 to 3\)"),
        ("lisa", 4, r"\[\d, \d\] in a training window \(optimizer steps 1 to 4\)"),
    ],
    ids=["grass-at-probe-end", "lisa-at-window-end"],
)
def test_no_gradient_reaching_the_layers_stops_the_run_at_the_end_of_the_probe_or_window(mode, stopped_at, where):
    module = reentrant_checkpointing_without_input_grads()
    before = [p.detach().clone() for p in layers_of(module).parameters()]
    callback = GRASSCallback(mode=mode, probe_steps=3, sample_every=4, train_embeddings=False, seed=0)
    trainer = make_trainer(max_steps=20, callbacks=[callback])
    with pytest.raises(NothingToTrainError) as raised, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.utils.checkpoint: "None of the inputs have requires_grad=True"
        trainer.fit(module, token_batches())

    assert trainer.global_step == stopped_at
    message = str(raised.value)
    assert re.match(
        rf"GRASS: no gradient reached any of the active layers {where}: every gradient there was missing or exactly "
        "zero, so nothing learns",
        message,
    )
    assert "reentrant gradient checkpointing" in message and "train_embeddings=False" in message
    assert 'gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})' in message
    assert "model.enable_input_require_grads()" in message
    assert all(torch.equal(a, b) for a, b in zip(before, layers_of(module).parameters(), strict=True))


def test_non_reentrant_checkpointing_with_frozen_embeddings_trains():
    module = TinyCausalLM()
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    callback = GRASSCallback(mode="grass", probe_steps=3, sample_every=4, train_embeddings=False, seed=0)
    fit_recording_warnings(callback, max_steps=7, module=module)
    assert all(value > 0 for value in callback.history[0]["importance"])


@pytest.mark.parametrize(
    ("mode", "probe_steps", "max_steps", "expected"),
    [
        (
            "grass",
            3,
            3,
            "GRASS: probe_steps=3 leaves no step to train within trainer.max_steps=3: probing updates no parameter "
            "and runs until optimizer step 3. Probing must end before the run's last step: set trainer.max_steps to "
            "at least 7 (probing and one sampling window of sample_every=4), or lower probe_steps to at most 2",
        ),
        (
            "grass_static",
            10**12,
            3,
            "GRASS: probe_steps=1000000000000 leaves no step to train within trainer.max_steps=3: probing updates no "
            "parameter and runs until optimizer step 1000000000000. Probing must end before the run's last step: set "
            "trainer.max_steps to at least 1000000000004 (probing and one sampling window of sample_every=4), or "
            "lower probe_steps to at most 2",
        ),
    ],
)
def test_a_max_steps_that_ends_the_run_while_probing_is_refused_before_any_step(mode, probe_steps, max_steps, expected):
    module = TinyCausalLM()
    before = [p.detach().clone() for p in module.parameters()]
    callback = GRASSCallback(mode=mode, probe_steps=probe_steps, sample_every=4, seed=0)
    with pytest.raises(SettingValueError) as raised:
        fit_recording_warnings(callback, max_steps=max_steps, module=module)
    assert str(raised.value) == expected
    assert callback._optimizer_steps == 0, "no step ran"
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert all(p.requires_grad for p in module.parameters()), "every parameter is trainable again"


def test_fast_dev_run_while_probing_is_warned_not_refused():
    module = TinyCausalLM()
    callback = GRASSCallback(probe_steps=10, seed=0)
    trainer = make_trainer(max_steps=-1, fast_dev_run=True, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, token_batches())
    messages = [str(w.message) for w in caught if str(w.message).startswith("GRASS:")]
    assert messages == [
        "GRASS: fast_dev_run ends the run while probing (probe_steps=10): the steps run the probe's hooks and update "
        "no parameter"
    ]
    assert trainer.global_step == 1


@pytest.mark.parametrize(
    ("mode", "max_steps", "expected"),
    [
        (
            "grass_static",
            5,
            "GRASS: trainer.max_steps=5 with probe_steps=3 and sample_every=4: only 2 steps train after probing, "
            "fewer than one sampling window, so only the layers drawn at step 3 ever train. Set trainer.max_steps to "
            "at least 7, or lower probe_steps or sample_every",
        ),
        ("grass", 4, "GRASS: trainer.max_steps=4 with probe_steps=3 and sample_every=4: only 1 step trains after"),
        ("grass", 7, None),
        ("lisa", 2, None),
        ("lisa", 1, None),
    ],
)
def test_a_max_steps_that_ends_the_run_within_the_first_window_is_warned_at_train_start(mode, max_steps, expected):
    callback = GRASSCallback(mode=mode, probe_steps=3, sample_every=4, seed=0)
    messages, trainer = fit_recording_warnings(callback, max_steps=max_steps)
    short = [m for m in messages if m.startswith("GRASS: trainer.max_steps=")]
    assert [m[: len(expected)] for m in short] == ([] if expected is None else [expected])
    assert trainer.global_step == max_steps


@pytest.mark.parametrize(
    ("accumulate", "max_steps", "expected"),
    [
        (
            1,
            -1,
            "GRASS: probe_steps=4 leaves no step to train within trainer.max_epochs=1 (4 optimizer steps): probing "
            "updates no parameter and runs until optimizer step 4. Probing must end before the run's last step: set "
            "trainer.max_epochs (or the batches per epoch) so that the run takes at least 6 steps (probing and one "
            "sampling window of sample_every=2), or lower probe_steps to at most 3",
        ),
        (
            2,
            -1,
            "GRASS: probe_steps=4 leaves no step to train within trainer.max_epochs=1 (2 optimizer steps): probing "
            "updates no parameter and runs until optimizer step 4. Probing must end before the run's last step: set "
            "trainer.max_epochs (or the batches per epoch) so that the run takes at least 6 steps (probing and one "
            "sampling window of sample_every=2), or lower probe_steps to at most 1",
        ),
        (
            1,
            3,
            "GRASS: probe_steps=4 leaves no step to train within trainer.max_steps=3: probing updates no parameter "
            "and runs until optimizer step 4. Probing must end before the run's last step: set trainer.max_steps to "
            "at least 6 (probing and one sampling window of sample_every=2), or lower probe_steps to at most 2",
        ),
    ],
    ids=["epochs", "epochs-accumulated", "max-steps-first"],
)
def test_where_max_epochs_bounds_the_run_its_estimated_steps_are_the_limit(accumulate, max_steps, expected):
    callback = GRASSCallback(probe_steps=4, sample_every=2, seed=0)
    trainer = make_trainer(max_epochs=1, max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=[callback])
    with pytest.raises(SettingValueError) as raised:
        trainer.fit(TinyCausalLM(), token_batches(num_batches=4))
    assert str(raised.value) == expected
    assert trainer.global_step == 0


def test_two_epochs_with_a_step_after_probing_train():
    callback = GRASSCallback(probe_steps=4, sample_every=2, seed=0)
    trainer = make_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(TinyCausalLM(), token_batches(num_batches=3))
    assert trainer.global_step == 6
    assert [(r["step"], r["trained"]) for r in callback.history] == [(4, True), (6, False)]


def _checkpointed_fit(tmp_path, callback, max_steps, lr=1e-2, resume_from=None, num_batches=1):
    """Fit with a checkpoint at every step; one batch per epoch, where a plain DataLoader resumes exactly."""
    every_step = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(max_steps=max_steps, callbacks=[callback, every_step], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyCausalLM(lr=lr), token_batches(num_batches=num_batches), ckpt_path=resume_from)
    return [str(w.message) for w in caught if str(w.message).startswith("GRASS:")]


@pytest.mark.parametrize(
    ("probe_steps", "max_steps", "expected"),
    [
        (
            3,
            3,
            "GRASS: probe_steps=3 leaves no step to train within trainer.max_steps=3: probing updates no parameter "
            "and runs until optimizer step 3, and this run resumes at step 2. Probing must end before the run's last "
            "step: set trainer.max_steps to at least 5 (probing and one sampling window of sample_every=2)",
        ),
        (
            1,
            3,
            "GRASS: probe_steps=1 leaves no step to train within trainer.max_steps=3: probing updates no parameter "
            "and runs until optimizer step 3, and this run resumes at step 2. Probing must end before the run's last "
            "step: set trainer.max_steps to at least 5 (probing and one sampling window of sample_every=2)",
        ),
        (
            5,
            4,
            "GRASS: probe_steps=5 leaves no step to train within trainer.max_steps=4: probing updates no parameter "
            "and runs until optimizer step 5, and this run resumes at step 2. Probing must end before the run's last "
            "step: set trainer.max_steps to at least 7 (probing and one sampling window of sample_every=2), or lower "
            "probe_steps to at most 3",
        ),
        (3, 4, None),
    ],
    ids=["probing-ends-at-max-steps", "lowered-probe-steps-end-at-the-next-step", "raised-probe-steps", "one-step"],
)
def test_a_resume_while_probing_is_checked_against_the_steps_left(tmp_path, probe_steps, max_steps, expected):
    _checkpointed_fit(tmp_path, GRASSCallback(probe_steps=3, sample_every=2, seed=0), max_steps=5)
    resumed = GRASSCallback(probe_steps=probe_steps, sample_every=2, seed=0)
    if expected is None:
        messages = _checkpointed_fit(tmp_path / "resumed", resumed, max_steps, resume_from=tmp_path / "step=2.ckpt")
        assert [m for m in messages if m.startswith("GRASS: trainer.max_steps")] == [
            "GRASS: trainer.max_steps=4 with probe_steps=3 and sample_every=2: only 1 step trains after probing, "
            "fewer than one sampling window, so only the layers drawn at step 3 ever train. Set trainer.max_steps to "
            "at least 5, or lower probe_steps or sample_every"
        ]
        assert [(r["step"], r["trained"]) for r in resumed.history] == [(3, True)]
        return
    with pytest.raises(SettingValueError) as raised:
        _checkpointed_fit(tmp_path / "resumed", resumed, max_steps, resume_from=tmp_path / "step=2.ckpt")
    assert str(raised.value) == expected
    assert resumed._optimizer_steps == 2, "no step ran after the checkpoint's"


def test_skipped_non_finite_steps_are_counted_and_kept_across_a_resume(tmp_path):
    # lr=1e30: the first AdamW step sends the weights to about 1e29, and every later gradient overflows.
    full = GRASSCallback(mode="lisa", sample_every=2, seed=0)
    messages = _checkpointed_fit(tmp_path, full, max_steps=5, lr=1e30)
    assert full.skipped_steps == [2, 3, 4, 5]
    assert [m.split(" has ")[0] for m in messages] == [f"GRASS: optimizer step {s}" for s in (2, 3, 4, 5)]
    assert full.state_dict()["skipped_steps"] == [2, 3, 4, 5]

    resumed = GRASSCallback(mode="lisa", sample_every=2, seed=0)
    _checkpointed_fit(tmp_path / "resumed", resumed, max_steps=5, lr=1e30, resume_from=tmp_path / "step=3.ckpt")
    assert resumed.skipped_steps == [2, 3, 4, 5], "steps 2 and 3 from the checkpoint, 4 and 5 from this run"

    old = torch.load(tmp_path / "step=3.ckpt", weights_only=False)
    (key,) = [k for k in old["callbacks"] if "GRASSCallback" in k]
    del old["callbacks"][key]["skipped_steps"], old["callbacks"][key]["train_start_step"]
    torch.save(old, tmp_path / "old.ckpt")
    from_old = GRASSCallback(mode="lisa", sample_every=2, seed=0)
    _checkpointed_fit(tmp_path / "from_old", from_old, max_steps=5, lr=1e30, resume_from=tmp_path / "old.ckpt")
    assert from_old.skipped_steps == [4, 5], "a checkpoint from before the count loads, counting from the resume"


def resume_lines(messages):
    return [m for m in messages if m.startswith("GRASS: resuming")]


def test_resuming_with_changed_settings_prints_one_line_per_setting_and_when_it_applies(tmp_path):
    settings = dict(probe_steps=2, sample_every=3, seed=0)
    _checkpointed_fit(tmp_path, GRASSCallback(**settings), max_steps=4)

    same = GRASSCallback(**settings)
    assert resume_lines(_checkpointed_fit(tmp_path / "same", same, 6, resume_from=tmp_path / "step=4.ckpt")) == []

    changed = GRASSCallback(n_active=3, probe_steps=2, sample_every=3, temperature=0.5, ema=0.3, seed=5)
    lines = resume_lines(_checkpointed_fit(tmp_path / "changed", changed, 6, resume_from=tmp_path / "step=4.ckpt"))
    assert lines == [
        "GRASS: resuming with n_active=3, the checkpoint was written with n_active=2; the new value applies from "
        "the next resample, at step 5",
        "GRASS: resuming with temperature=0.5, the checkpoint was written with temperature=1.0; the probabilities "
        "were recomputed from the checkpoint's importance; the new value applies from the next resample, at step 5",
        "GRASS: resuming with ema=0.3, the checkpoint was written with ema=0.5; the new value applies from the next "
        "refresh, at step 5",
        "GRASS: resuming with seed=5, the checkpoint was written with seed=0; it has no effect: the sampling "
        "generator continues from its state in the checkpoint",
    ]
    by_step = {record["step"]: record for record in changed.history}
    assert [len(by_step[step]["active_layers"]) for step in (2, 5)] == [2, 3], "n_active=3 from step 5 on"
    assert changed.history[:1] == same.history[:1], "the checkpoint's history is kept"
    probe_importance = torch.tensor(by_step[2]["importance"])
    refreshed = torch.tensor(by_step[5]["importance"])
    active = by_step[2]["active_layers"]
    frozen = [i for i in range(NUM_LAYERS) if i not in active]
    assert torch.equal(refreshed[frozen], probe_importance[frozen])
    same_refresh = torch.tensor({r["step"]: r for r in same.history}[5]["importance"])
    window_mean = (same_refresh[active] - 0.5 * probe_importance[active]) / 0.5  # what ema=0.5 mixed in
    # The same window mean mixed with ema=0.3 instead of 0.5: float32 EMAs, a few roundings of values near 1e-2.
    assert torch.allclose(refreshed[active], 0.3 * window_mean + 0.7 * probe_importance[active], rtol=1e-5, atol=0)


def test_resuming_while_probing_with_changed_schedule_applies_it_at_once(tmp_path):
    _checkpointed_fit(tmp_path, GRASSCallback(probe_steps=2, sample_every=3, seed=0), max_steps=3)
    callback = GRASSCallback(probe_steps=3, sample_every=2, seed=0)
    lines = resume_lines(_checkpointed_fit(tmp_path / "resumed", callback, 7, resume_from=tmp_path / "step=1.ckpt"))
    assert lines == [
        "GRASS: resuming with probe_steps=3, the checkpoint was written with probe_steps=2; the new value applies "
        "now: probing ends at step 3",
        "GRASS: resuming with sample_every=2, the checkpoint was written with sample_every=3; the new value applies "
        "from the draw at the end of probing, at step 3, then every 2 steps (refreshes too, as update_every=None)",
    ]
    assert [record["step"] for record in callback.history] == [3, 5, 7]


def test_resuming_fixed_mode_with_other_fixed_layers_trains_them_from_the_first_step(tmp_path):
    _checkpointed_fit(tmp_path, GRASSCallback(mode="fixed", fixed_layers=[0, 1]), max_steps=2)
    callback = GRASSCallback(mode="fixed", fixed_layers=[2, 3])
    every_step = ModelCheckpoint(tmp_path / "resumed", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(max_steps=4, callbacks=[callback, every_step], enable_checkpointing=True)
    module = TinyCausalLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, token_batches(num_batches=1), ckpt_path=tmp_path / "step=2.ckpt")
    assert resume_lines([str(w.message) for w in caught]) == [
        "GRASS: resuming with fixed_layers=(2, 3), the checkpoint was written with fixed_layers=(0, 1); the new "
        "value applies from step 3, the first of this run"
    ]
    assert callback.active_layers == [2, 3]
    windows = [(record["step"], record["active_layers"], record["trained"]) for record in callback.history]
    assert windows == [(0, [0, 1], True), (2, [2, 3], True)], "the new fixed layers are a window of their own"
    in_state = {id(p) for p in trainer.optimizers[0].state}
    trained_layers = [i for i in range(NUM_LAYERS) if any(id(p) in in_state for p in layers_of(module)[i].parameters())]
    assert trained_layers == [2, 3], "the checkpoint's moments of layers 0 and 1 were dropped, 2 and 3 have their own"


@pytest.mark.parametrize(("train_embeddings", "train_head"), [(False, True), (True, False), (True, True)])
def test_a_tied_head_follows_train_embeddings_and_a_disagreement_is_warned_once(train_embeddings, train_head):
    module = TinyCausalLM()
    config = tiny_llama_config(4, tie_word_embeddings=True)
    module.model = LlamaForCausalLM(config)
    module.model.tie_weights()
    tied = module.model.model.embed_tokens.weight
    assert tied is module.model.lm_head.weight
    before = tied.detach().clone()
    callback = GRASSCallback(mode="lisa", n_active=2, seed=0, train_embeddings=train_embeddings, train_head=train_head)
    messages, _ = fit_recording_warnings(callback, max_steps=2, module=module)
    tied_warnings = [m for m in messages if "tied tensor" in m]
    if train_embeddings == train_head:
        assert tied_warnings == []
    else:
        assert tied_warnings == [
            "GRASS: model.model.embed_tokens.weight and model.lm_head.weight are one tied tensor; it trains with the "
            f"embeddings (train_embeddings={train_embeddings}), so train_head={train_head} does not apply to it"
        ]
    assert torch.equal(before, tied) == (not train_embeddings)
