"""What the callback checkpoints: only what cannot be derived, and checkpoints of the earlier format still resume.

``fixtures/grass_callback_v1.ckpt`` was written by the format-1 callback (commit cecbde7): a 2-layer Llama,
``GRASSCallback(mode="grass_static", n_active=1, probe_steps=2, sample_every=2, seed=0)``, saved at step 6.
``fixtures/grass_callback_v1_continued.json`` holds the draws that code made when resumed from it to step 12.
``grass_static`` draws from the importance measured while probing, which the checkpoint holds, and the sampling
generator's state, so the draws do not depend on the machine.
"""

import json
from pathlib import Path

import torch
from conftest import TinyCausalLM, make_trainer, token_batches
from lightning.pytorch.callbacks import Callback

from lightning_grass import GRASSCallback
from lightning_grass.sampling import selection_counts

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


def test_the_state_holds_only_what_cannot_be_derived_and_draw_shares_count_every_draw():
    callback = GRASSCallback(mode="grass", n_active=2, probe_steps=2, sample_every=2, seed=3)
    make_trainer(max_steps=14, callbacks=[callback]).fit(TinyCausalLM(), token_batches(num_batches=14))
    state = callback.state_dict()
    assert sorted(state) == [
        "active_layers",
        "config",
        "format",
        "generator",
        "history",
        "mgn",
        "optimizer_steps",
        "skipped_steps",
        "train_start_step",
    ]
    assert (state["format"], state["train_start_step"], state["optimizer_steps"]) == (2, 2, 14)
    assert torch.equal(callback.importance, state["mgn"]["importance"]), "importance is the MGN tracker's"
    for index, record in enumerate(callback.history):
        counts = selection_counts(callback.history[: index + 1], 4)
        assert record["draw_share"] == [count / sum(counts) for count in counts]
