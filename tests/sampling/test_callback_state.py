"""What the callback checkpoints: only what cannot be derived, and checkpoints of the earlier format still resume.

``fixtures/grass_callback_v1.ckpt`` was written by the format-1 callback (commit cecbde7): a 2-layer Llama,
``GRASSCallback(mode="grass_static", n_active=1, probe_steps=2, sample_every=2, seed=0)``, saved at step 6.
``fixtures/grass_callback_v1_continued.json`` holds the draws that code made when resumed from it to step 12.
``grass_static`` draws from the importance measured while probing, which the checkpoint holds, and the sampling
generator's state, so the draws do not depend on the machine.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_grass import GRASSCallback
from lightning_grass.sampling.distribution import selection_counts

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "grass_callback_v1.ckpt"


def legacy_callback():
    return GRASSCallback(mode="grass_static", n_active=1, probe_steps=2, sample_every=2, seed=0)


class AtTrainStart(Callback):
    """The callback's derived state once the resume has restored it."""

    def __init__(self, grass):
        self.grass, self.seen = grass, {}

    def on_train_start(self, trainer, pl_module):
        grass = self.grass
        self.seen = {"phase": grass.phase, "importance": grass.importance, "probabilities": grass.probabilities}


def test_a_format_1_checkpoint_resumes_with_its_phase_importance_probabilities_and_draws():
    saved = torch.load(LEGACY, weights_only=False)["callbacks"]["GRASSCallback"]
    assert "format" not in saved and saved["phase"] == "train", "the fixture is in the format-1 layout"
    callback = legacy_callback()
    peek = AtTrainStart(callback)
    make_trainer(max_steps=12, callbacks=[callback, peek]).fit(
        TinyCausalLM(num_layers=2), token_batches(), ckpt_path=LEGACY
    )
    assert peek.seen["phase"] == "train"
    # Derived again by the same computation from the same float32 values: bitwise equal to what format 1 stored.
    assert torch.equal(peek.seen["importance"], saved["importance"])
    assert torch.equal(peek.seen["probabilities"], saved["probabilities"])
    expected = json.loads((FIXTURES / "grass_callback_v1_continued.json").read_text())
    assert [record["step"] for record in callback.history] == expected["history_steps"]
    assert [record["active_layers"] for record in callback.history] == expected["history_active_layers"]
    # Format 1 kept no `trained`: every record before the checkpoint's step 6 was followed by a step; the draw at
    # step 12, the last of this run, trained nothing.
    assert [record["trained"] for record in callback.history] == [True] * 5 + [False]


def test_the_state_holds_only_what_cannot_be_derived_and_a_records_draw_share_counts_its_own_draw():
    callback = GRASSCallback(mode="grass", n_active=2, probe_steps=2, sample_every=2, seed=3)
    make_trainer(max_steps=14, callbacks=[callback]).fit(TinyCausalLM(), token_batches(num_batches=14))
    state = callback.state_dict()
    assert sorted(state) == [
        "active_units",
        "config",
        "format",
        "generator",
        "history",
        "mgn",
        "optimizer_steps",
        "skipped_steps",
        "train_start_step",
    ]
    assert (state["format"], state["train_start_step"], state["optimizer_steps"]) == (3, 2, 14)
    assert torch.equal(callback.importance, state["mgn"]["importance"]), "importance is the MGN tracker's"
    for index, record in enumerate(callback.history):
        earlier = selection_counts(callback.history[:index], 4)
        counts = [count + (layer in record["active_layers"]) for layer, count in enumerate(earlier)]
        assert record["draw_share"] == [count / sum(counts) for count in counts]


def fit_with_checkpoints(tmp_path, callback, max_steps, resume_from=None):
    """Fit with a checkpoint at every step; one batch per epoch, where a plain DataLoader resumes exactly."""
    every_step = ModelCheckpoint(tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(max_steps=max_steps, callbacks=[callback, every_step], enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyCausalLM(), token_batches(num_batches=1), ckpt_path=resume_from)
    return callback


def windows(callback):
    return [(record["step"], record["active_layers"], record["trained"]) for record in callback.history]


def test_a_draw_at_the_last_step_trained_nothing_and_is_left_out_of_counts_and_shares():
    callback = GRASSCallback(mode="grass", n_active=1, probe_steps=2, sample_every=2, seed=0)
    make_trainer(max_steps=8, callbacks=[callback]).fit(TinyCausalLM(), token_batches())
    assert windows(callback) == [(2, [2], True), (4, [2], True), (6, [3], True), (8, [0], False)]
    assert selection_counts(callback.history, 4) == [0, 0, 2, 1]
    assert callback.draw_share == [0.0, 0.0, 2 / 3, 1 / 3]
    assert callback.history[-1]["draw_share"] == [0.25, 0.0, 0.5, 0.25], "the record's own draw counts in its share"


@pytest.mark.parametrize("written_before_trained_was_kept", [False, True], ids=["format-3", "format-2-without-trained"])
def test_a_draw_at_a_checkpoints_last_step_counts_once_it_trains_after_the_resume(
    tmp_path, written_before_trained_was_kept
):
    settings = dict(mode="grass", n_active=1, probe_steps=2, sample_every=2, seed=0)
    uninterrupted = fit_with_checkpoints(tmp_path / "full", GRASSCallback(**settings), max_steps=10)
    first = fit_with_checkpoints(tmp_path / "first", GRASSCallback(**settings), max_steps=8)
    checkpoint = torch.load(tmp_path / "first" / "step=8.ckpt", weights_only=False)
    saved = checkpoint["callbacks"]["GRASSCallback"]
    assert (saved["history"][-1]["step"], saved["history"][-1]["trained"]) == (8, False)
    assert first.draw_share == [0.0, 0.0, 2 / 3, 1 / 3], "three windows trained; the draw at step 8 did not"
    if written_before_trained_was_kept:  # format 2: no `trained`, and the active units named `active_layers`
        for record in saved["history"]:
            del record["trained"], record["active_units"]
        saved["active_layers"] = saved.pop("active_units")
        saved["format"] = 2
        torch.save(checkpoint, tmp_path / "first" / "step=8.ckpt")

    resumed = fit_with_checkpoints(
        tmp_path / "resumed", GRASSCallback(**settings), max_steps=10, resume_from=tmp_path / "first" / "step=8.ckpt"
    )
    assert windows(uninterrupted) == [(2, [2], True), (4, [2], True), (6, [3], True), (8, [2], True), (10, [1], False)]
    assert windows(resumed) == windows(uninterrupted)
    assert selection_counts(resumed.history, 4) == [0, 0, 3, 1]
    assert resumed.draw_share == uninterrupted.draw_share == [0.0, 0.0, 0.75, 0.25]
    assert [r["draw_share"] for r in resumed.history] == [r["draw_share"] for r in uninterrupted.history]
