import dataclasses

import pytest

from lightning_grass import GRASSConfig
from lightning_grass.sampling.resume_changes import changed_settings, resume_warnings, when_setting_applies


def test_changed_settings_are_listed_in_the_configs_order_and_only_when_they_differ():
    config = GRASSConfig(mode="fixed", n_active=2, fixed_layers=[0, 1])
    saved = {**dataclasses.asdict(config), "seed": 3, "layers": "model.layers", "n_active": 5}
    saved["fixed_layers"] = [0, 1]  # a list where the config holds a tuple: the same layers
    del saved["train_towers"]  # a setting added after the checkpoint was written
    assert changed_settings(saved, GRASSConfig(mode="fixed", fixed_layers=[0, 1], train_towers=True)) == [
        "layers",
        "seed",
    ], "n_active is the length of fixed_layers in fixed mode, and is not compared"


def test_a_resume_after_probing_says_when_each_new_value_applies():
    saved = dataclasses.asdict(GRASSConfig(probe_steps=2, sample_every=3))
    config = GRASSConfig(probe_steps=4, sample_every=3, normalize="rank", importance="relative", layers="model.h")
    assert resume_warnings(saved, config, step=4, train_start=2) == [
        "GRASS: resuming with probe_steps=4, the checkpoint was written with probe_steps=2; it has no effect: "
        "probing ended at step 2",
        "GRASS: resuming with normalize='rank', the checkpoint was written with normalize='mean'; the probabilities "
        "were recomputed from the checkpoint's importance; the new value applies from the next resample, at step 5",
        "GRASS: resuming with importance='relative', the checkpoint was written with importance='mgn'; the new "
        "signal is measured from step 5 on; the importance carried over used the old one",
        "GRASS: resuming with layers='model.h', the checkpoint was written with layers=None; the new value applies "
        "from step 5, the first of this run",
    ]
    assert resume_warnings(saved, GRASSConfig(probe_steps=2, sample_every=3), step=4, train_start=2) == []


@pytest.mark.parametrize(
    ("config", "name", "train_start", "expected"),
    [
        (
            GRASSConfig(),
            "importance",
            None,
            "the new signal is measured from step 5 on; the probing steps so far used the old one",
        ),
        (GRASSConfig(), "temperature", None, "the new value applies from the draw at the end of probing, at step 10"),
        (GRASSConfig(update_every=2), "ema", 3, "the new value applies from the next refresh, at step 5"),
        (GRASSConfig(mode="lisa"), "probe_steps", 0, "it has no effect: mode='lisa' does not probe"),
        (GRASSConfig(mode="lisa"), "ema", 0, "it has no effect: mode='lisa' does not refresh importance"),
        (GRASSConfig(mode="lisa"), "normalize", 0, "it has no effect: mode='lisa' samples uniformly"),
        (GRASSConfig(mode="lisa"), "n_active", 0, "the new value applies from the next resample, at step 25"),
        (
            GRASSConfig(mode="fixed", fixed_layers=[1]),
            "temperature",
            0,
            "it has no effect: mode='fixed' trains fixed_layers and never samples",
        ),
        (
            GRASSConfig(mode="grass_static"),
            "importance",
            3,
            "it has no effect: mode='grass_static' measured importance only while probing, which ended at step 3",
        ),
        (
            GRASSConfig(target_effective_layers=2.0),
            "temperature",
            3,
            "it has no effect: target_effective_layers=2.0 chooses the temperature",
        ),
    ],
)
def test_when_a_new_value_applies(config, name, train_start, expected):
    assert when_setting_applies(name, config, step=4, train_start=train_start) == expected
